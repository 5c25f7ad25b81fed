// Word cache for exact SentencePiece BPE encoding (megatron_osp.data.word_cache).
//
// A SentencePiece BPE model trained with split_by_whitespace has no piece that spans a word
// boundary (a "▁" that follows a non-"▁" character), so BPE over a whole document is the
// concatenation of BPE over its words. Natural text repeats words heavily, so each word's ids are
// computed once and then looked up. A word never seen is encoded here by the same algorithm as
// SentencePiece's BPE (repeatedly merge the adjacent pair whose piece has the highest score,
// leftmost first; what is left outside the vocabulary becomes byte pieces), on symbol ids rather
// than strings. Python checks that the model qualifies; tests compare with SentencePiece itself.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace py = pybind11;

namespace {

constexpr char kSpace[] = "\xE2\x96\x81";  // U+2581, SentencePiece's escaped whitespace
constexpr size_t kSpaceLen = 3;

// The ASCII table: the character each becomes, or one of these.
constexpr uint8_t kDelete = 0xFF, kWhitespace = 0xFE;

inline bool is_space_at(std::string_view s, size_t i) {
  return i + kSpaceLen <= s.size() && std::memcmp(s.data() + i, kSpace, kSpaceLen) == 0;
}

inline size_t utf8_len(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c >> 5) == 0x6) return 2;
  if ((c >> 4) == 0xE) return 3;
  if ((c >> 3) == 0x1E) return 4;
  return 1;  // stray continuation byte (never produced from a Python str)
}

inline uint64_t hash_bytes(std::string_view s) {  // FNV-1a, then a final mix: keys are short words
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ULL;
  return h ^ (h >> 32);
}

inline uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Where a word's ids are: pool offset and count (in the call-local pool when `local`).
struct Entry {
  uint64_t off;
  uint32_t len;
  bool local;
};

// Open-addressing word -> Entry table, keys in one arena; no erase (the cache only grows, and the
// per-call table is cleared whole). std::unordered_map cost more than the BPE it saved.
class WordTable {
 public:
  WordTable() : slots_(1 << 12) {}

  const Entry* find(std::string_view w, uint64_t h) const {
    for (size_t i = h & (slots_.size() - 1);; i = (i + 1) & (slots_.size() - 1)) {
      const Slot& s = slots_[i];
      if (!s.used) return nullptr;
      if (s.hash == h && s.key_len == w.size() && std::memcmp(keys_.data() + s.key_off, w.data(), w.size()) == 0)
        return &s.entry;
    }
  }

  void insert(std::string_view w, uint64_t h, Entry e) {  // w must not be present
    if (2 * (size_ + 1) > slots_.size()) grow();
    place(Slot{h, keys_.size(), static_cast<uint32_t>(w.size()), true, e});
    keys_.append(w);
    ++size_;
  }

  void clear() {
    if (size_ == 0) return;
    std::fill(slots_.begin(), slots_.end(), Slot{});
    keys_.clear();
    size_ = 0;
  }

  size_t size() const { return size_; }

 private:
  struct Slot {
    uint64_t hash = 0, key_off = 0;
    uint32_t key_len = 0;
    bool used = false;
    Entry entry{};
  };

  void place(const Slot& s) {
    size_t i = s.hash & (slots_.size() - 1);
    while (slots_[i].used) i = (i + 1) & (slots_.size() - 1);
    slots_[i] = s;
  }

  void grow() {
    std::vector<Slot> old(slots_.size() * 2);
    old.swap(slots_);
    for (const Slot& s : old)
      if (s.used) place(s);
  }

  std::vector<Slot> slots_;
  std::string keys_;
  size_t size_ = 0;
};

// (left symbol id, right symbol id) -> merged piece, open addressing: the BPE's hot lookup.
class MergeTable {
 public:
  struct Merge {
    int32_t id;
    float score;
  };

  void build(const std::vector<std::pair<uint64_t, Merge>>& items) {
    size_t cap = 16;
    while (cap < 2 * items.size()) cap *= 2;
    keys_.assign(cap, kEmpty);
    vals_.assign(cap, Merge{0, 0.f});
    for (const auto& [k, v] : items) {
      size_t i = mix(k) & (cap - 1);
      while (keys_[i] != kEmpty && keys_[i] != k) i = (i + 1) & (cap - 1);
      keys_[i] = k;
      vals_[i] = v;
    }
  }

  static uint64_t key(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
  }

  const Merge* find(int32_t left, int32_t right) const {
    uint64_t k = key(left, right);
    for (size_t i = mix(k) & (keys_.size() - 1);; i = (i + 1) & (keys_.size() - 1)) {
      if (keys_[i] == k) return &vals_[i];
      if (keys_[i] == kEmpty) return nullptr;
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~0ULL;  // no key: symbol ids are below 2^31
  std::vector<uint64_t> keys_;
  std::vector<Merge> vals_;
};

class WordCache {
 public:
  // pieces/piece_ids/scores: the model's normal pieces (the only ones merges may form);
  // byte_ids: the <0xXX> piece of each byte.
  WordCache(py::bytes ascii_table, bool remove_extra_whitespaces, bool add_dummy_prefix,
            bool merge_space_runs, size_t max_entries, size_t max_word_bytes, const std::vector<std::string>& pieces,
            const std::vector<int32_t>& piece_ids, const std::vector<float>& scores, std::vector<int32_t> byte_ids)
      : byte_ids_(std::move(byte_ids)),
        remove_extra_ws_(remove_extra_whitespaces),
        dummy_prefix_(add_dummy_prefix),
        merge_space_runs_(merge_space_runs),
        max_entries_(max_entries),
        max_word_bytes_(max_word_bytes) {
    std::string a = ascii_table;
    if (a.size() != 128) throw std::invalid_argument("ascii_table must have 128 entries");
    for (size_t i = 0; i < 128; ++i) {
      uint8_t v = static_cast<uint8_t>(a[i]);
      if (v >= 128 && v != kDelete && v != kWhitespace) throw std::invalid_argument("bad ascii table entry");
      ascii_table_[i] = static_cast<uint8_t>(a[i]);
    }
    if (piece_ids.size() != pieces.size() || scores.size() != pieces.size())
      throw std::invalid_argument("pieces, piece_ids and scores differ in length");
    if (byte_ids_.size() != 256) throw std::invalid_argument("byte_ids must have 256 entries");
    build_merges(pieces, piece_ids, scores);
  }

  // SentencePiece's normalization of an ASCII string (as the model's table says), "▁" escaped.
  std::string normalize_ascii(std::string_view in) const {
    std::string out;
    out.reserve(in.size() + 2 * in.size() / 5 + kSpaceLen);
    if (in.empty()) return out;
    if (!remove_extra_ws_) {  // every whitespace kept; the dummy prefix even if nothing else is
      if (dummy_prefix_) out.append(kSpace, kSpaceLen);
      for (unsigned char c : in) {
        uint8_t act = table_entry(c);
        if (act == kWhitespace) out.append(kSpace, kSpaceLen);
        else if (act != kDelete) out.push_back(static_cast<char>(act));
      }
      return out;
    }
    // Leading and trailing whitespace dropped, runs collapsed; the dummy prefix only before text.
    bool pending_space = false, any = false;
    for (unsigned char c : in) {
      uint8_t act = table_entry(c);
      if (act == kDelete) continue;
      if (act == kWhitespace) {
        pending_space = any;
        continue;
      }
      if (!any && dummy_prefix_) out.append(kSpace, kSpaceLen);
      if (pending_space) out.append(kSpace, kSpaceLen);
      pending_space = false;
      any = true;
      out.push_back(static_cast<char>(act));
    }
    return out;
  }

  // Word boundaries: before every "▁", or with merge_space_runs only before the first of a run
  // (the model has pieces such as "▁▁", so a run of spaces belongs with the word after it).
  void split(std::string_view s, std::vector<std::string_view>& words) const {
    size_t start = 0;
    bool prev_space = false;
    for (size_t i = 0; i < s.size();) {
      if (is_space_at(s, i)) {
        if (i > start && !(merge_space_runs_ && prev_space)) {
          words.emplace_back(s.substr(start, i - start));
          start = i;
        }
        prev_space = true;
        i += kSpaceLen;
      } else {
        prev_space = false;
        ++i;
      }
    }
    if (s.size() > start) words.emplace_back(s.substr(start));
  }

  // texts[i] is raw ASCII when normalized[i] is false, else already normalized by SentencePiece.
  // Returns (ids int32, document lengths int64).
  py::tuple encode(const std::vector<std::string>& texts, const std::vector<bool>& normalized) {
    if (texts.size() != normalized.size()) throw std::invalid_argument("texts and normalized differ in length");
    std::vector<Entry> entries;
    std::vector<int64_t> lengths_v(texts.size());
    size_t total = 0;
    {
      py::gil_scoped_release nogil;
      std::vector<std::string_view> words;
      std::string norm;
      for (size_t d = 0; d < texts.size(); ++d) {
        if (!normalized[d]) norm = normalize_ascii(texts[d]);
        words.clear();
        split(normalized[d] ? std::string_view(texts[d]) : std::string_view(norm), words);
        int64_t n = 0;
        for (std::string_view w : words) {
          entries.push_back(find_or_encode(w));
          n += entries.back().len;
        }
        lengths_v[d] = n;
        total += n;
      }
    }
    py::array_t<int64_t> lengths(texts.size());
    if (!texts.empty()) std::memcpy(lengths.mutable_data(), lengths_v.data(), texts.size() * sizeof(int64_t));
    py::array_t<int32_t> ids(total);
    {
      py::gil_scoped_release nogil;
      int32_t* at = ids.mutable_data();
      for (const Entry& e : entries) {
        const int32_t* src = (e.local ? local_pool_.data() : pool_.data()) + e.off;
        if (e.len) std::memcpy(at, src, e.len * sizeof(int32_t));
        at += e.len;
      }
      local_pool_.clear();
      local_.clear();
    }
    return py::make_tuple(ids, lengths);
  }

  // SentencePiece's BPE of one normalized word (no cache).
  std::vector<int32_t> bpe(std::string_view word) {
    std::vector<int32_t> out;
    bpe_into(word, out);
    return out;
  }

  size_t size() const { return cache_.size(); }

 private:
  struct Symbol {
    uint32_t begin, size;
    int32_t id;  // symbol id: a piece id, or a synthetic id (>= kSynthetic) for a character outside the vocabulary
    int32_t prev, next;
  };
  struct Pair {
    int32_t left, right;
    float score;
    uint32_t size;
  };
  // Highest score first; equal scores: leftmost first (SentencePiece's SymbolPairComparator).
  struct PairOrder {
    bool operator()(const Pair& a, const Pair& b) const {
      return a.score < b.score || (a.score == b.score && a.left > b.left);
    }
  };
  static constexpr int32_t kSynthetic = 1 << 30;
  static constexpr int32_t kNoId = -1;  // a character no piece contains: it never merges

  uint8_t table_entry(unsigned char c) const {
    if (c >= 128) throw std::invalid_argument("normalize_ascii: not an ASCII text");
    return ascii_table_[c];
  }

  static uint32_t char_key(std::string_view c) {  // a UTF-8 character (1-4 bytes) as one integer
    uint32_t k = 0;
    std::memcpy(&k, c.data(), std::min<size_t>(c.size(), 4));
    return k;
  }

  // Every way a piece is the concatenation of two symbols, keyed by the symbols' ids. A symbol is
  // a piece, or a single character (a piece may contain a character that is not itself a piece).
  void build_merges(const std::vector<std::string>& pieces, const std::vector<int32_t>& ids,
                    const std::vector<float>& scores) {
    std::fill(ascii_ids_, ascii_ids_ + 128, kNoId);
    std::unordered_map<std::string_view, int32_t> piece_id;
    for (size_t i = 0; i < pieces.size(); ++i) piece_id.emplace(pieces[i], ids[i]);
    auto symbol_id = [&](std::string_view s) -> int32_t {  // a new synthetic id for a new character
      auto it = piece_id.find(s);
      if (it != piece_id.end()) return it->second;
      if (s.empty() || utf8_len(static_cast<unsigned char>(s[0])) != s.size()) return kNoId;
      auto c = char_ids_.find(char_key(s));
      if (c != char_ids_.end()) return c->second;
      int32_t id = kSynthetic + static_cast<int32_t>(char_ids_.size());
      char_ids_.emplace(char_key(s), id);
      return id;
    };
    for (size_t i = 0; i < pieces.size(); ++i)  // single-character pieces first: their own ids
      if (!pieces[i].empty() && utf8_len(static_cast<unsigned char>(pieces[i][0])) == pieces[i].size())
        char_ids_.emplace(char_key(pieces[i]), ids[i]);
    std::vector<std::pair<uint64_t, MergeTable::Merge>> merges;
    for (size_t i = 0; i < pieces.size(); ++i) {
      std::string_view p = pieces[i];
      for (size_t k = utf8_len(static_cast<unsigned char>(p[0])); k < p.size();
           k += utf8_len(static_cast<unsigned char>(p[k]))) {
        int32_t l = symbol_id(p.substr(0, k)), r = symbol_id(p.substr(k));
        if (l == kNoId || r == kNoId) continue;  // a part no symbol can be: never formed this way
        merges.emplace_back(MergeTable::key(l, r), MergeTable::Merge{ids[i], scores[i]});
      }
    }
    merges_.build(merges);
    for (auto& [key, id] : char_ids_)
      if (key < 128 && id >= 0) ascii_ids_[key] = id;
  }

  int32_t char_symbol(std::string_view c) const {
    if (c.size() == 1 && static_cast<unsigned char>(c[0]) < 128) return ascii_ids_[static_cast<unsigned char>(c[0])];
    auto it = char_ids_.find(char_key(c));
    return it == char_ids_.end() ? kNoId : it->second;
  }

  Entry find_or_encode(std::string_view w) {
    uint64_t h = hash_bytes(w);
    if (const Entry* e = cache_.find(w, h)) return *e;
    if (const Entry* e = local_.find(w, h)) return *e;
    bool keep = cache_.size() < max_entries_ && w.size() <= max_word_bytes_;
    std::vector<int32_t>& pool = keep ? pool_ : local_pool_;
    size_t off = pool.size();
    bpe_into(w, pool);
    Entry e{off, static_cast<uint32_t>(pool.size() - off), !keep};
    (keep ? cache_ : local_).insert(w, h, e);
    return e;
  }

  void bpe_into(std::string_view text, std::vector<int32_t>& out) {
    std::vector<Symbol>& sym = symbols_;  // reused scratch: most words are a few characters
    std::vector<Pair>& agenda = agenda_;
    sym.clear();
    agenda.clear();
    for (size_t i = 0; i < text.size();) {
      size_t n = std::min(utf8_len(static_cast<unsigned char>(text[i])), text.size() - i);
      int32_t idx = static_cast<int32_t>(sym.size());
      sym.push_back(Symbol{static_cast<uint32_t>(i), static_cast<uint32_t>(n), char_symbol(text.substr(i, n)),
                           idx - 1, -1});
      if (idx > 0) sym[idx - 1].next = idx;
      i += n;
    }
    const PairOrder order;
    auto maybe_add = [&](int32_t left, int32_t right) {
      if (left < 0 || right < 0 || sym[left].id == kNoId || sym[right].id == kNoId) return;
      const MergeTable::Merge* m = merges_.find(sym[left].id, sym[right].id);
      if (m == nullptr) return;
      agenda.push_back(Pair{left, right, m->score, sym[left].size + sym[right].size});
      std::push_heap(agenda.begin(), agenda.end(), order);
    };
    for (size_t i = 1; i < sym.size(); ++i) maybe_add(static_cast<int32_t>(i) - 1, static_cast<int32_t>(i));
    while (!agenda.empty()) {
      std::pop_heap(agenda.begin(), agenda.end(), order);
      Pair top = agenda.back();
      agenda.pop_back();
      Symbol &l = sym[top.left], &r = sym[top.right];
      if (l.size == 0 || r.size == 0 || l.size + r.size != top.size) continue;  // stale
      l.id = merges_.find(l.id, r.id)->id;
      l.size += r.size;
      l.next = r.next;
      if (r.next >= 0) sym[r.next].prev = top.left;
      r.size = 0;
      maybe_add(l.prev, top.left);
      maybe_add(top.left, l.next);
    }
    for (int32_t i = sym.empty() ? -1 : 0; i != -1; i = sym[i].next) {
      if (sym[i].id >= 0 && sym[i].id < kSynthetic) {
        out.push_back(sym[i].id);
      } else {  // outside the vocabulary: byte fallback
        for (unsigned char c : text.substr(sym[i].begin, sym[i].size)) out.push_back(byte_ids_[c]);
      }
    }
  }

  MergeTable merges_;
  std::unordered_map<uint32_t, int32_t> char_ids_;   // character -> symbol id
  int32_t ascii_ids_[128];
  std::vector<int32_t> byte_ids_;
  uint8_t ascii_table_[128];
  bool remove_extra_ws_, dummy_prefix_, merge_space_runs_;
  size_t max_entries_, max_word_bytes_;
  WordTable cache_, local_;  // local_: words not kept (cache full or too long), this call only
  std::vector<int32_t> pool_, local_pool_;
  std::vector<Symbol> symbols_;  // bpe_into's scratch
  std::vector<Pair> agenda_;
};

}  // namespace

PYBIND11_MODULE(_word_cache, m) {
  m.doc() = "Word cache for exact SentencePiece BPE encoding; see megatron_osp/data/word_cache.py";
  py::class_<WordCache>(m, "WordCache")
      .def(py::init<py::bytes, bool, bool, bool, size_t, size_t, const std::vector<std::string>&,
                    const std::vector<int32_t>&, const std::vector<float>&, std::vector<int32_t>>(),
           py::arg("ascii_table"), py::arg("remove_extra_whitespaces"), py::arg("add_dummy_prefix"),
           py::arg("merge_space_runs"), py::arg("max_entries"), py::arg("max_word_bytes"), py::arg("pieces"),
           py::arg("piece_ids"), py::arg("scores"), py::arg("byte_ids"))
      .def("normalize_ascii",
           [](const WordCache& c, const std::string& s) { return py::bytes(c.normalize_ascii(s)); })
      .def("split",
           [](const WordCache& c, const std::string& s) {
             std::vector<std::string_view> w;
             c.split(s, w);
             return std::vector<std::string>(w.begin(), w.end());
           })
      .def("bpe", &WordCache::bpe, py::arg("word"))
      .def("encode", &WordCache::encode, py::arg("texts"), py::arg("normalized"))
      .def("__len__", &WordCache::size);
}
