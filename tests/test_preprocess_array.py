"""Issue 18: preprocessing as N array tasks (SLURM) + one merge == the single run, byte for byte; a failed
task leaves nothing the merge takes, and the merge refuses a set that is incomplete or mixes runs."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_osp.data import merge
from megatron_osp.data.array_tasks import plan, resolve_task
from megatron_osp.data.indexed import IndexedDataset
from megatron_osp.data.preprocess import preprocess
from megatron_osp.data.tokenizer import train_sentencepiece

REPO = Path(__file__).resolve().parents[1]
WORDS = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor".split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = d / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(WORDS[i:] + WORDS[:i])}) + "\n" for i in range(12)) * 20)
    return str(train_sentencepiece(corpus, d / "tok", vocab_size=300))


def _corpus(directory, n_files=7, seed=0):
    """Files of very different sizes (so the byte-balanced split is not one file per task), some empty
    documents, a gzip file; returns the paths in order."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(n_files):
        docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 40))) for _ in range(rng.choice([3, 10, 40]))]
        lines = "".join(json.dumps({"text": f"file {f} doc {i} " * (i % 2) + t, "title": t[:9]}) + "\n"
                        for i, t in enumerate(docs))
        path = directory / f"part{f}.jsonl"
        path.write_text(lines)
        paths.append(str(path))
    return paths


def _cli(tool, *args, env=None, check=True, cwd=None):
    r = subprocess.run([sys.executable, str(REPO / "tools" / tool), *map(str, args)], capture_output=True,
                       text=True, timeout=300, env={**os.environ, **(env or {})}, cwd=cwd)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _task(inputs, tok, prefix, *extra, env=None, check=True):
    return _cli("preprocess_data.py", "--input", *inputs, "--tokenizer-model", tok, "--output-prefix", prefix,
                "--append-eod", "--no-progress", *extra, env=env, check=check)


def _bytes(prefix):
    return {ext: Path(f"{prefix}{ext}").read_bytes() for ext in (".bin", ".idx")}


def _no_slurm():
    return {k: "" for k in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN",
                            "SLURM_ARRAY_TASK_MAX")}


# --- the split ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(40))
def test_the_byte_balanced_split_is_contiguous_deterministic_and_within_one_file_of_ideal(seed):
    rng = random.Random(seed)
    n_files = rng.randint(0, 60)
    sizes = [rng.choice([0, rng.randint(1, 100), rng.randint(1, 10**6), int(rng.lognormvariate(10, 2))])
             for _ in range(n_files)]
    for n in sorted({1, 2, 3, 7, max(1, n_files), n_files + 3, rng.randint(1, 100)}):
        ranges = plan(sizes, n)
        assert ranges == plan(list(sizes), n)  # deterministic
        assert len(ranges) == n and ranges[0][0] == 0 and ranges[-1][1] == n_files
        assert all(lo <= hi for lo, hi in ranges)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in order
        covered = [i for lo, hi in ranges for i in range(lo, hi)]
        assert covered == list(range(n_files))  # every file exactly once, order kept
        ideal = sum(sizes) / n
        biggest = max(sizes, default=0)
        shares = [sum(sizes[lo:hi]) for lo, hi in ranges]
        assert max(shares) <= ideal + biggest and min(shares) >= ideal - biggest, (sizes, n, shares)


def test_the_split_balances_bytes_not_files():
    assert plan([10, 10, 10, 10, 40], 2) == [(0, 4), (4, 5)]
    assert plan([100, 1, 1], 3) == [(0, 0), (0, 1), (1, 3)]  # nothing to give task 0: it is empty
    with pytest.raises(ValueError, match="must be >= 1"):
        plan([1], 0)


# --- which task am I ----------------------------------------------------------------------------------

def _env(count, task_id, lo=None, hi=None):
    env = {"SLURM_ARRAY_TASK_COUNT": str(count), "SLURM_ARRAY_TASK_ID": str(task_id)}
    if lo is not None:
        env |= {"SLURM_ARRAY_TASK_MIN": str(lo), "SLURM_ARRAY_TASK_MAX": str(hi)}
    return env


def test_task_from_slurm_array_variables():
    assert resolve_task(None, None, {}) is None  # not an array: a single run
    assert resolve_task(None, None, _env(4, 7, 5, 8))[:2] == (2, 4)  # --array=5-8: ids from MIN
    assert resolve_task(None, None, _env(4, 3))[:2] == (3, 4)  # no MIN/MAX: ids taken as 0-based
    assert resolve_task(None, None, _env(1, 0, 0, 0)) is None  # an array of one: a single run
    assert resolve_task(3, 1, _env(4, 3, 0, 3))[:2] == (1, 3)  # explicit options win
    assert resolve_task(8, None, _env(2, 5, 2, 5))[:2] == (5, 8)  # --num-tasks + --array=2,5: ids are indices
    assert resolve_task(1, None, _env(4, 2, 0, 3)) is None  # --num-tasks 1: a single run inside any array
    with pytest.raises(ValueError, match=r"ids 0\.\.10 are not 6 consecutive numbers"):
        resolve_task(None, None, _env(6, 4, 0, 10))  # --array=0-10:2
    with pytest.raises(ValueError, match=r"task index 4 \(from SLURM_ARRAY_TASK_ID.*0-based.*\) is not in 0\.\.3"):
        resolve_task(None, None, _env(4, 4))  # 1-based ids without MIN: refused, not guessed
    with pytest.raises(ValueError, match=r"task index 8 .* not in 0\.\.7"):
        resolve_task(8, None, _env(8, 8, 1, 8))  # --num-tasks 8 with --array=1-8
    with pytest.raises(ValueError, match="--task-index needs --num-tasks"):
        resolve_task(None, 2, {})
    with pytest.raises(ValueError, match="--num-tasks 3 needs --task-index"):
        resolve_task(3, None, {})
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID='x' is not a whole number"):
        resolve_task(None, None, {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "x"})


# --- tasks + merge == the single run --------------------------------------------------------------------

@pytest.mark.parametrize("shard", [None, 300], ids=["unsharded-tasks", "sharded-tasks"])
def test_three_array_tasks_and_the_merge_equal_the_single_run_byte_for_byte(tmp_path, tok, shard):
    inputs = _corpus(tmp_path / "in")
    keys = ("--json-keys", "text", "title")
    _task(inputs, tok, tmp_path / "single" / "c", *keys, env=_no_slurm())
    extra = (*keys, "--max-shard-tokens", shard) if shard else keys
    order = [2, 0, 1]
    random.Random(shard).shuffle(order)
    for i in order:
        if i == 1:  # this one as a SLURM array element of --array=4-6 would see it
            r = _task(inputs, tok, tmp_path / "out" / "c", *extra, env=_env(3, 5, 4, 6))
            assert "array task 1 of 3 (SLURM_ARRAY_TASK_ID 5 - SLURM_ARRAY_TASK_MIN 4" in r.stdout
        else:
            _task(inputs, tok, tmp_path / "out" / "c", *extra, "--num-tasks", 3, "--task-index", i, env=_no_slurm())
    out = tmp_path / "out"
    per_task = [json.loads((out / f"c_task{i:05d}of00003_text_document.shards.json").read_text()) for i in range(3)]
    assert [len(m["array"]["files"]) for m in per_task] != [0, 0, 7]  # the work is really split
    assert sum(len(m["array"]["files"]) for m in per_task) == len(inputs)
    if shard:
        assert any(len(m["datasets"]) > 1 for m in per_task)
    r = _cli("merge_datasets.py", "--tasks", out / "c", "--tokenizer-model", tok)
    assert "merged 3 tasks" in r.stdout
    for key in ("text", "title"):
        assert _bytes(out / f"c_{key}_document") == _bytes(tmp_path / "single" / f"c_{key}_document"), key
    merged = json.loads((out / "c_text_document.shards.json").read_text())
    assert merged["state"] == "complete" and merged["inputs"] == [os.path.abspath(p) for p in inputs]
    assert merged["merged_from"]["tasks"] == 3
    assert len(IndexedDataset(out / "c_text_document")) == len(IndexedDataset(tmp_path / "single" / "c_text_document"))
    # Merged with --max-shard-tokens: the same shards as a single run with it (not the tasks' shard size).
    _task(inputs, tok, tmp_path / "single" / "s", *keys, "--max-shard-tokens", 700, env=_no_slurm())
    r = _cli("merge_datasets.py", "--tasks", out / "c", "--output-prefix", out / "s", "--max-shard-tokens", "7e2")
    single = sorted(p.name for p in (tmp_path / "single").glob("s_*_document_*.bin"))
    assert len(single) > 4 and sorted(p.name for p in out.glob("s_*_document_*.bin")) == single
    for name in single:
        assert _bytes(out / name[:-4]) == _bytes(tmp_path / "single" / name[:-4]), name


def test_more_tasks_than_files_gives_empty_tasks_and_the_same_result(tmp_path, tok, monkeypatch):
    inputs = _corpus(tmp_path / "in", n_files=2)
    preprocess(inputs, tok, str(tmp_path / "single"), progress=False, json_keys=("text", "title"))
    for i in (3, 1, 0, 2):
        preprocess(inputs, tok, str(tmp_path / "t"), progress=False, task=(i, 4), json_keys=("text", "title"))
    assert sum(json.loads((tmp_path / f"t_task{i:05d}of00004_text_document.shards.json").read_text())
               ["datasets"][0]["documents"] == 0 for i in range(4)) >= 2
    _cli("merge_datasets.py", "--tasks", tmp_path / "t")
    for key in ("text", "title"):
        assert _bytes(tmp_path / f"t_{key}_document") == _bytes(tmp_path / f"single_{key}_document")
    # The merge streams the tasks in pieces (bounded memory); pieces of a few documents change nothing.
    monkeypatch.setattr(merge, "CHUNK_DOCUMENTS", 3)
    monkeypatch.setattr(merge, "CHUNK_BYTES", 100)
    preprocess(inputs, tok, str(tmp_path / "one"), progress=False, json_keys=("text", "title"), max_shard_tokens=90)
    merge.merge_tasks(str(tmp_path / "t"), str(tmp_path / "m"), max_shard_tokens=90)
    shards = sorted(p.name[:-4] for p in tmp_path.glob("one_*_document_*.bin"))
    assert len(shards) > 10 and sorted(p.name[:-4] for p in tmp_path.glob("m_*_document_*.bin")) == [
        "m" + name[3:] for name in shards]
    for name in shards:
        assert _bytes(tmp_path / ("m" + name[3:])) == _bytes(tmp_path / name), name


def test_the_merge_takes_the_tasks_content_samples_and_they_equal_the_single_runs(tmp_path, tok, monkeypatch):
    """An unsharded merge's content sample (the retokenized-overlap check's input) is the tasks' samples
    together, read from their manifests, not hashed again; equal to a single run's, duplicate documents
    included. A sharded merge hashes (a sample is per shard) and equals a single sharded run's too."""
    import megatron_osp.data.sharded_output as sharded_output
    from megatron_osp.data import content_identity
    from megatron_osp.data.content_identity import recorded_sample

    monkeypatch.setattr(content_identity, "SAMPLE_RATE", 2)  # about half the documents sampled, not 1/1024
    inputs = _corpus(tmp_path / "in", n_files=5, seed=3)
    keys = ("text", "title")
    preprocess(inputs, tok, str(tmp_path / "single"), progress=False, json_keys=keys)
    preprocess(inputs, tok, str(tmp_path / "one"), progress=False, json_keys=keys, max_shard_tokens=200)
    for i in (2, 0, 1):
        preprocess(inputs, tok, str(tmp_path / "t"), progress=False, task=(i, 3), json_keys=keys)
    real = sharded_output.sampled_documents
    monkeypatch.setattr(sharded_output, "sampled_documents", lambda *a: pytest.fail("the merge hashed documents"))
    merge.merge_tasks(str(tmp_path / "t"))
    for key in keys:
        single, merged = (recorded_sample(str(tmp_path / f"{p}_{key}_document")) for p in ("single", "t"))
        assert len(single) > 20 and np.array_equal(merged, single), key
    titles = recorded_sample(str(tmp_path / "single_title_document"))
    assert len(np.unique(titles)) < len(titles)  # repeated titles: duplicates kept on both sides
    monkeypatch.setattr(sharded_output, "sampled_documents", real)
    merge.merge_tasks(str(tmp_path / "t"), str(tmp_path / "m"), max_shard_tokens=200)
    shards = sorted(p.name[:-4] for p in tmp_path.glob("one_*_document_*.bin"))
    assert len(shards) > 4
    for name in shards:
        assert np.array_equal(recorded_sample(str(tmp_path / ("m" + name[3:]))), recorded_sample(str(tmp_path / name)))


# --- failures -------------------------------------------------------------------------------------------

def test_a_failed_task_leaves_nothing_and_the_merge_names_it(tmp_path, tok):
    inputs = _corpus(tmp_path / "in", n_files=6)
    bad = Path(inputs[3])
    bad.write_text(bad.read_text() + "{broken\n")
    which = next(i for i, (lo, hi) in enumerate(plan([os.path.getsize(p) for p in inputs], 3)) if lo <= 3 < hi)
    out = tmp_path / "out"
    for i in range(3):
        r = _task(inputs, tok, out / "c", "--num-tasks", 3, "--task-index", i, env=_no_slurm(), check=i != which)
        if i == which:
            failed = r
    r = failed
    assert r.returncode == 1 and f"{bad}:" in r.stderr and "malformed JSON" in r.stderr
    assert not list(out.glob(f"*task{which:05d}*")) and not list(out.glob(".*"))  # nothing of it, not even a stage
    r = _cli("merge_datasets.py", "--tasks", out / "c", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"task {which} (--task-index {which}): no complete output" in r.stderr
    assert f"c_task{which:05d}of00003_<key>_document.shards.json is missing" in r.stderr
    assert not list(out.glob("c_text_document*"))  # nothing merged
    # Rerunning only that task, skipping the bad record, completes the set: == a single run that skips it.
    _task(inputs, tok, out / "c", "--num-tasks", 3, "--task-index", which, "--skip-bad-records", env=_no_slurm())
    _cli("merge_datasets.py", "--tasks", out / "c")
    _task(inputs, tok, tmp_path / "single", "--skip-bad-records", env=_no_slurm())
    assert _bytes(out / "c_text_document") == _bytes(tmp_path / "single_text_document")
    assert json.loads((out / "c_text_document.shards.json").read_text())["skip_bad_records"] is True
    # --input-dir over the directory would take the tasks beside their merged result: refused, pointing to --tasks.
    r = _cli("merge_datasets.py", "--input-dir", out, "--output-prefix", tmp_path / "all", check=False)
    assert r.returncode == 1 and f"merge them with --tasks {out / 'c'}" in r.stderr


def test_an_interrupted_or_killed_task_is_refused_by_name(tmp_path, tok):
    inputs = _corpus(tmp_path / "in", n_files=4)
    for i in range(2):
        preprocess(inputs, tok, str(tmp_path / "c"), progress=False, task=(i, 2))
    manifest = tmp_path / "c_task00001of00002_text_document.shards.json"
    good = manifest.read_text()
    manifest.write_text(json.dumps({**json.loads(good), "state": "publishing"}))  # a publish cut short
    r = _cli("merge_datasets.py", "--tasks", tmp_path / "c", check=False)
    assert r.returncode == 1 and "task 1 (--task-index 1)" in r.stderr and "interrupted while publishing" in r.stderr
    manifest.unlink()  # a killed task: its stage directory is what is left
    stage = tmp_path / ".c_task00001of00002.stage-otherhost-123"
    stage.mkdir()
    r = _cli("merge_datasets.py", "--tasks", tmp_path / "c", check=False)
    assert r.returncode == 1 and f"its unfinished stage {stage.name} is there" in r.stderr
    assert not list(tmp_path.glob("c_text_document*"))


def test_a_task_set_mixing_two_runs_is_refused(tmp_path, tok, tmp_path_factory):
    inputs = _corpus(tmp_path / "in", n_files=5)
    for i in range(3):
        preprocess(inputs, tok, str(tmp_path / "c"), progress=False, task=(i, 3))
    # Task 1 again, over another input list: its output is of another run.
    extra = tmp_path / "in" / "extra.jsonl"
    extra.write_text(json.dumps({"text": "one more"}) + "\n")
    preprocess([*inputs, str(extra)], tok, str(tmp_path / "c"), progress=False, task=(1, 3))
    r = _cli("merge_datasets.py", "--tasks", tmp_path / "c", check=False)
    assert r.returncode == 1, r.stdout
    assert "task 1 (" in r.stderr and "comes from a different run than task(s) 0, 2: input files: 6 files" in r.stderr
    assert not list(tmp_path.glob("c_text_document*"))
    preprocess(inputs, tok, str(tmp_path / "c"), progress=False, task=(1, 3))  # the same run again: whole
    _cli("merge_datasets.py", "--tasks", tmp_path / "c", "--output-prefix", tmp_path / "ok" / "c")
    # Another tokenizer for task 2.
    other = tmp_path_factory.mktemp("tok2")
    (other / "c.jsonl").write_text("".join(json.dumps({"text": " ".join(WORDS[:i])}) + "\n" for i in range(1, 12)) * 30)
    tok2 = str(train_sentencepiece(other / "c.jsonl", other / "tok", vocab_size=320))
    preprocess(inputs, tok2, str(tmp_path / "c"), progress=False, task=(2, 3))
    r = _cli("merge_datasets.py", "--tasks", tmp_path / "c", check=False)
    assert r.returncode == 1 and "task 2 (" in r.stderr and "tokenizer" in r.stderr and "tok2" in r.stderr
    # A second array of another size beside the first: which one is meant must be said.
    for i in range(2):
        preprocess(inputs, tok, str(tmp_path / "c"), progress=False, task=(i, 2))
    r = _cli("merge_datasets.py", "--tasks", tmp_path / "c", check=False)
    assert r.returncode == 1 and "runs with 2 and 3 tasks" in r.stderr
    _cli("merge_datasets.py", "--tasks", tmp_path / "c", "--num-tasks", 2)
    r = _cli("merge_datasets.py", "--tasks", tmp_path / "c", "--num-tasks", 2, "--tokenizer-model", tok2, check=False)
    assert r.returncode == 1 and "not the tokenizer the tasks used" in r.stderr


def test_bad_task_options_are_refused_before_work(tmp_path, tok):
    inputs = _corpus(tmp_path / "in", n_files=2)
    r = _task(inputs, tok, tmp_path / "out" / "c", "--task-index", 1, env=_no_slurm(), check=False)
    assert r.returncode == 1 and "--task-index needs --num-tasks" in r.stderr
    r = _task(inputs, tok, tmp_path / "out" / "c", env=_env(6, 4, 0, 10), check=False)
    assert r.returncode == 1 and "not 6 consecutive numbers" in r.stderr
    r = _task(inputs, tok, tmp_path / "out" / "c", "--num-tasks", 3, "--task-index", 3, env=_no_slurm(), check=False)
    assert r.returncode == 1 and "task index 3" in r.stderr and "0..2" in r.stderr
    assert not (tmp_path / "out").exists()


# --- examples/preprocess_slurm.sh, with a stand-in sbatch that runs the jobs here -----------------------

FAKE_SBATCH = r'''
import os, random, subprocess, sys
state = os.environ["FAKE_SLURM_STATE"]
opts, i = {}, 1
while i < len(sys.argv) and sys.argv[i].startswith("--"):
    key, _, value = sys.argv[i][2:].partition("=")
    opts[key] = value
    i += 1
script, args = sys.argv[i], sys.argv[i + 1:]
job = sum(n.endswith(".submitted") for n in os.listdir(state)) + 100
with open(os.path.join(state, f"{job}.submitted"), "w") as f:
    f.write(repr(sys.argv[1:]))
dep = opts.get("dependency", "")
if dep and not os.path.exists(os.path.join(state, dep.split(":")[1] + ".ok")):
    print(job)  # SLURM would never start it
    sys.exit(0)
ids = [0]
if "array" in opts:
    ids = []
    for part in opts["array"].split(","):
        lo, _, hi = part.partition("-")
        ids += range(int(lo), int(hi or lo) + 1)
env = {**os.environ, "SLURM_SUBMIT_DIR": os.getcwd(), "SLURM_JOB_ID": str(job)}
if "array" in opts:
    env |= {"SLURM_ARRAY_JOB_ID": str(job), "SLURM_ARRAY_TASK_COUNT": str(len(ids)),
            "SLURM_ARRAY_TASK_MIN": str(min(ids)), "SLURM_ARRAY_TASK_MAX": str(max(ids))}
ok = True
for task in random.Random(job).sample(ids, len(ids)):  # array elements run in any order
    log = opts["output"].replace("%x", opts.get("job-name", "job")).replace("%A", str(job))
    log = log.replace("%a", str(task)).replace("%j", str(job))
    with open(log, "w") as out:
        r = subprocess.run(["bash", script, *args], env={**env, "SLURM_ARRAY_TASK_ID": str(task)},
                           stdout=out, stderr=subprocess.STDOUT)
    ok &= r.returncode == 0
if ok:
    open(os.path.join(state, f"{job}.ok"), "w").close()
print(job)
'''


def _fake_slurm(tmp_path):
    bindir, state = tmp_path / "bin", tmp_path / "slurm-state"
    bindir.mkdir()
    state.mkdir()
    (bindir / "sbatch").write_text(f"#!{sys.executable}\n{FAKE_SBATCH}")
    (bindir / "sbatch").chmod(0o755)
    return {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_STATE": str(state),
            "PYTHON": sys.executable, **_no_slurm()}, state


def _submit(tmp_path, env, *args, check=True):
    r = subprocess.run(["bash", str(REPO / "examples" / "preprocess_slurm.sh"), *map(str, args)], cwd=tmp_path,
                       env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def test_the_slurm_example_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(REPO / "examples" / "preprocess_slurm.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_the_slurm_example_runs_the_array_and_the_merge(tmp_path, tok):
    _corpus(tmp_path / "in", n_files=5)
    env, state = _fake_slurm(tmp_path)
    common = ("--input", "in/*.jsonl", "--tokenizer-model", tok, "--append-eod", "--json-keys", "text", "title")
    r = _submit(tmp_path, {**env, "TASKS": "3", "CPUS_PER_TASK": "1"}, *common, "--output-prefix", "data/c",
                "--max-shard-tokens", 400)
    assert "task 2:" in r.stdout and "submitted array job 100" in r.stdout and "merge job 101" in r.stdout
    assert "--dependency=afterok:100" in (state / "101.submitted").read_text()
    assert (state / "100.ok").exists() and (state / "101.ok").exists(), list((tmp_path / "logs").iterdir())
    # == one run with the same arguments (sharded the same way), from the same directory
    _cli("preprocess_data.py", *common, "--output-prefix", tmp_path / "single" / "c", "--max-shard-tokens", 400,
         "--no-progress", env=_no_slurm(), cwd=tmp_path)
    single = sorted(p.name[:-4] for p in (tmp_path / "single").glob("c_*.bin"))
    merged = sorted(p.name[:-4] for p in (tmp_path / "data").glob("c_*.bin") if "_task" not in p.name)
    assert len(single) > 6 and merged == single
    for name in single:
        assert _bytes(tmp_path / "data" / name) == _bytes(tmp_path / "single" / name), name


def test_the_slurm_example_after_a_failed_task(tmp_path, tok):
    inputs = _corpus(tmp_path / "in", n_files=5)
    Path(inputs[-1]).write_text(Path(inputs[-1]).read_text() + "{broken\n")
    env, state = _fake_slurm(tmp_path)
    args = ("--input", "in/*.jsonl", "--tokenizer-model", tok, "--append-eod", "--output-prefix", "data/c")
    r = _submit(tmp_path, {**env, "TASKS": "3", "CPUS_PER_TASK": "1"}, *args)
    assert not (state / "100.ok").exists() and not (state / "101.ok").exists()  # the merge never ran
    assert "malformed JSON" in (tmp_path / "logs" / "prep-c-100_2.out").read_text()
    assert not list((tmp_path / "data").glob("c_task00002*")) and not list((tmp_path / "data").glob("c_text*"))
    # Resubmit only the failed task, skipping the bad record: a merge follows it.
    r = _submit(tmp_path, {**env, "TASKS": "3", "CPUS_PER_TASK": "1", "ARRAY": "2"}, *args, "--skip-bad-records")
    assert "tasks 2 of 3" in r.stdout and (state / "102.ok").exists() and (state / "103.ok").exists()
    _task([tmp_path / "in" / "*.jsonl"], tok, tmp_path / "single" / "c", "--skip-bad-records", env=_no_slurm())
    assert _bytes(tmp_path / "data" / "c_text_document") == _bytes(tmp_path / "single" / "c_text_document")
    # Options the script owns, and a missing file, are refused before anything is queued.
    r = _submit(tmp_path, env, *args, "--num-tasks", 2, check=False)
    assert r.returncode == 1 and "set TASKS" in r.stderr
    r = _submit(tmp_path, env, *args[:2], "in/missing.jsonl", *args[2:], check=False)
    assert r.returncode == 1 and "in/missing.jsonl does not exist" in r.stderr
    assert len(list(state.glob("*.submitted"))) == 4


def _hf_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator([" ".join(WORDS[i:] + WORDS[:i]) for i in range(12)] * 10, trainers.BpeTrainer(
        vocab_size=330, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(path))
    return str(path)


def test_tasks_with_a_hugging_face_tokenizer(tmp_path):
    tok = _hf_tokenizer(tmp_path / "tokenizer.json")
    inputs = _corpus(tmp_path / "in", n_files=4)
    preprocess(inputs, tok, str(tmp_path / "single"), progress=False)
    for i in (1, 0):
        preprocess(inputs, tok, str(tmp_path / "t"), progress=False, task=(i, 2))
    merge.merge_tasks(str(tmp_path / "t"), tokenizer_model=str(tmp_path))  # a directory holding tokenizer.json
    assert _bytes(tmp_path / "t_text_document") == _bytes(tmp_path / "single_text_document")
    manifests = [json.loads((tmp_path / f"{p}_text_document.shards.json").read_text()) for p in ("single", "t")]
    assert manifests[0]["tokenizer_fingerprint"] == manifests[1]["tokenizer_fingerprint"]


def test_tasks_are_one_run_by_their_tokenizer_file_not_its_fingerprint(tmp_path):
    """A re-saved copy of the tokenizer (other bytes, same ids) passes as the merge's --tokenizer-model,
    but a task run with it is of another run: the tasks of one run are given one file."""
    tok = _hf_tokenizer(tmp_path / "tokenizer.json")
    copy = tmp_path / "copy.json"
    copy.write_text(json.dumps(json.loads(Path(tok).read_text()), indent=7))
    inputs = _corpus(tmp_path / "in", n_files=4)
    for i in (0, 1):
        preprocess(inputs, tok, str(tmp_path / "t"), progress=False, task=(i, 2))
    merge.merge_tasks(str(tmp_path / "t"), str(tmp_path / "m"), tokenizer_model=str(copy))
    preprocess(inputs, str(copy), str(tmp_path / "t"), progress=False, task=(1, 2))
    with pytest.raises(ValueError, match=r"task 1 \(.*\) comes from a different run than task\(s\) 0: tokenizer "
                                         rf"{copy} \(sha256 .*\) vs tokenizer {tok}"):
        merge.merge_tasks(str(tmp_path / "t"), str(tmp_path / "m2"))
    assert not list(tmp_path.glob("m2*"))


def test_the_slurm_example_refuses_an_abbreviated_option_before_submitting(tmp_path, tok):
    """preprocess_data.py took `--max-shard 400` for --max-shard-tokens, which the example reads by its full
    name to shard the merge as the tasks: the tasks were sharded and the merged output was not."""
    _corpus(tmp_path / "in", n_files=2)
    env, state = _fake_slurm(tmp_path)
    r = _submit(tmp_path, {**env, "TASKS": "2", "CPUS_PER_TASK": "1"}, "--input", "in/*.jsonl", "--tokenizer-model",
                tok, "--output-prefix", "data/c", "--max-shard", 400, check=False)
    assert r.returncode != 0 and "unrecognized arguments: --max-shard" in r.stderr, r.stderr[-2000:]
    assert not list(state.iterdir()) and not (tmp_path / "data").exists()


def test_the_slurm_example_checks_the_final_prefix_before_queueing_and_passes_overwrite_to_the_merge(tmp_path, tok):
    """An earlier output of other inputs on --output-prefix: the array run's merge (the one step that
    publishes there) refused it only after every task had run, and --overwrite reached the tasks but not
    the merge, so it could not be given at all. Now the pre-check (--plan) refuses it before anything is
    queued, and --overwrite reaches the merge."""
    inputs = _corpus(tmp_path / "in", n_files=3)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "an earlier corpus"}) + "\n")
    _cli("preprocess_data.py", "--input", other, "--tokenizer-model", tok, "--output-prefix", "data/c",
         "--no-progress", env=_no_slurm(), cwd=tmp_path)
    before = _bytes(tmp_path / "data" / "c_text_document")
    env, state = _fake_slurm(tmp_path)
    env = {**env, "TASKS": "2", "CPUS_PER_TASK": "1"}
    args = ("--input", "in/*.jsonl", "--tokenizer-model", tok, "--output-prefix", "data/c")
    r = _submit(tmp_path, env, *args, check=False)
    assert r.returncode != 0 and "an earlier output is there (it was made from other inputs" in r.stderr, r.stderr
    assert "--overwrite to replace it" in r.stderr
    assert not list(state.iterdir()) and _bytes(tmp_path / "data" / "c_text_document") == before
    _submit(tmp_path, env, *args, "--overwrite")
    assert (state / "101.ok").exists(), list((tmp_path / "logs").iterdir())
    manifest = json.loads((tmp_path / "data" / "c_text_document.shards.json").read_text())
    assert [os.path.realpath(p) for p in manifest["inputs"]] == \
        [os.path.realpath(p) for p in inputs if p.endswith(".jsonl")]


def test_an_array_of_task_indices_outside_the_tasks_is_refused_before_anything_is_queued(tmp_path):
    """ARRAY=3 TASKS=3 (task 3 counted from 1) used to be queued: the task failed in its job ('task index 3
    ... is not in 0..2') and SLURM cancelled the merge. Now ARRAY is checked first: indices 0..TASKS-1,
    SLURM's N, N-M, N-M:S lists and a %K throttle."""
    env, state = _fake_slurm(tmp_path)
    args = ("--input", "in/*.jsonl", "--tokenizer-model", "tok.model", "--output-prefix", "data/c")
    for array in ("3", "0-3", "1,3", "2-1", "x", "0-2:0%", "1,", "%2"):
        r = _submit(tmp_path, {**env, "TASKS": "3", "ARRAY": array}, *args, check=False)
        assert r.returncode == 1 and f"error: ARRAY={array}: " in r.stderr and "0..2" in r.stderr, (array, r.stderr)
    for array in ("2", "0-2", "0,2", "0-2:2", "0-2%1"):  # accepted: on to the plan (here: no input files)
        r = _submit(tmp_path, {**env, "TASKS": "3", "ARRAY": array}, *args, check=False)
        assert r.returncode != 0 and "ARRAY=" not in r.stderr, (array, r.stderr)
    assert not list(state.glob("*.submitted"))
