// check.cc: block encoding, log parsing and the checks of tvilling-check (see check.h).
#include "tests/checker/check.h"

#include <xxhash.h>

#include <charconv>
#include <cstring>
#include <set>
#include <sstream>

namespace tvilling::check {
namespace {

constexpr char kMagic[8] = {'T', 'V', 'C', 'H', 'E', 'C', 'K', '1'};
constexpr size_t kPayloadBegin = 32;
constexpr size_t kSumAt = kBlockSize - 8;

void Put64(char* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<char>(v >> (8 * i));
}
void Put32(char* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<char>(v >> (8 * i));
}
uint64_t Get64(const char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}
uint32_t Get32(const char* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

uint64_t SplitMix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

std::string Describe(const Write& w) {
  std::ostringstream s;
  s << "write " << w.writer << "/" << w.seq << " (block " << w.block << ", issued at "
    << w.issued_ns << " ns";
  if (w.ended_ns) {
    s << (w.error == 0 ? ", completed at " : ", failed at ") << *w.ended_ns << " ns";
    if (w.error != 0) s << " with errno " << w.error;
  } else {
    s << ", never completed";
  }
  s << ")";
  return s.str();
}

// a's end was logged before b was issued: b is later than a in real time.
bool Precedes(const Write& a, const Write& b) { return a.ended_ns && *a.ended_ns < b.issued_ns; }

template <typename T>
bool Num(std::string_view s, T* out) {
  const auto r = std::from_chars(s.data(), s.data() + s.size(), *out);
  return r.ec == std::errc() && r.ptr == s.data() + s.size();
}

std::vector<std::string_view> Fields(std::string_view line) {
  std::vector<std::string_view> f;
  size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && line[i] == ' ') ++i;
    const size_t b = i;
    while (i < line.size() && line[i] != ' ') ++i;
    if (i > b) f.push_back(line.substr(b, i - b));
  }
  return f;
}

}  // namespace

void EncodeBlock(uint32_t writer, uint64_t seq, uint64_t block, char* out) {
  std::memcpy(out, kMagic, sizeof kMagic);
  Put32(out + 8, writer);
  Put32(out + 12, 0);
  Put64(out + 16, seq);
  Put64(out + 24, block);
  uint64_t s = (static_cast<uint64_t>(writer) << 48) ^ (seq * 0x100000001b3ull) ^ (block << 20);
  for (size_t i = kPayloadBegin; i < kSumAt; i += 8) Put64(out + i, SplitMix(s));
  Put64(out + kSumAt, XXH64(out, kSumAt, 0));
}

Decoded DecodeBlock(const char* data) {
  Decoded d;
  bool zero = true;
  for (size_t i = 0; i < kBlockSize && zero; ++i) zero = data[i] == 0;
  if (zero) return d;
  if (std::memcmp(data, kMagic, sizeof kMagic) != 0) {
    d.kind = Decoded::Kind::kForeign;
    return d;
  }
  d.writer = Get32(data + 8);
  d.seq = Get64(data + 16);
  d.block = Get64(data + 24);
  if (Get64(data + kSumAt) != XXH64(data, kSumAt, 0) || Get32(data + 12) != 0) {
    d.kind = Decoded::Kind::kTorn;
    return d;
  }
  d.kind = Decoded::Kind::kValid;
  return d;
}

const char* KindName(Decoded::Kind k) {
  switch (k) {
    case Decoded::Kind::kZero:
      return "zero";
    case Decoded::Kind::kValid:
      return "valid";
    case Decoded::Kind::kTorn:
      return "torn";
    case Decoded::Kind::kForeign:
      return "foreign";
  }
  return "?";
}

std::optional<WriterLog> ParseLog(std::string_view text, const std::string& name,
                                  std::string* error) {
  WriterLog log;
  size_t lineno = 0;
  bool header = false;
  auto fail = [&](const std::string& what) {
    *error = name + ":" + std::to_string(lineno) + ": " + what;
    return std::nullopt;
  };
  while (!text.empty()) {
    const size_t nl = text.find('\n');
    if (nl == std::string_view::npos) break;  // the writer died while writing this line
    const std::string_view line = text.substr(0, nl);
    text.remove_prefix(nl + 1);
    ++lineno;
    const auto f = Fields(line);
    if (f.empty()) continue;
    if (!header) {
      if (f.size() != 4 || f[0] != "tvilling-check" || f[1] != "1" ||
          f[2].substr(0, 7) != "writer=" || f[3].substr(0, 5) != "size=" ||
          !Num(f[2].substr(7), &log.writer) || !Num(f[3].substr(5), &log.size)) {
        return fail("not a tvilling-check log (expected 'tvilling-check 1 writer=ID size=BYTES')");
      }
      header = true;
      continue;
    }
    if (f[0] == "I") {
      Write w;
      w.writer = log.writer;
      if (f.size() != 4 || !Num(f[1], &w.seq) || !Num(f[2], &w.block) || !Num(f[3], &w.issued_ns)) {
        return fail("malformed issue line '" + std::string(line) + "'");
      }
      if (w.block >= log.size / kBlockSize) return fail("block beyond the log's size");
      if (!log.writes.empty() && w.seq <= log.writes.rbegin()->first) {
        return fail("sequence " + std::to_string(w.seq) + " does not increase");
      }
      log.writes.emplace(w.seq, w);
    } else if (f[0] == "C") {
      uint64_t seq = 0;
      int64_t t = 0;
      int err = 0;
      if (f.size() != 4 || !Num(f[1], &seq) || !Num(f[2], &t) || !Num(f[3], &err)) {
        return fail("malformed completion line '" + std::string(line) + "'");
      }
      auto it = log.writes.find(seq);
      if (it == log.writes.end()) return fail("completion of unissued write " + std::string(f[1]));
      if (it->second.ended_ns) return fail("second completion of write " + std::to_string(seq));
      if (t < it->second.issued_ns) return fail("completion before issue");
      it->second.ended_ns = t;
      it->second.error = err;
    } else if (f[0] == "R") {
      if (f.size() < 3) return fail("malformed connect line");
      ++log.connects;
      if (f[2] != "ok") ++log.failed_connects;
    } else {
      return fail("unknown event '" + std::string(f[0]) + "'");
    }
  }
  if (!header) return fail("empty log (no header)");
  return log;
}

std::string VerifyResult::Summary() const {
  std::ostringstream s;
  s << blocks << " blocks checked, " << held << " hold a write, " << completed
    << " writes completed, " << missing << " completed writes missing (" << prefix_breaks
    << " of them break the prefix)";
  if (counts.empty()) {
    s << "; no violation";
  } else {
    s << "; violations:";
    for (const auto& [k, n] : counts) s << " " << k << "=" << n;
  }
  return s.str();
}

std::optional<VerifyResult> Verify(const std::vector<WriterLog>& logs, Image& image,
                                   const VerifyOptions& o, std::string* error) {
  std::map<uint32_t, const WriterLog*> by_writer;
  uint64_t size = 0;
  for (const WriterLog& l : logs) {
    if (!by_writer.emplace(l.writer, &l).second) {
      *error = "two logs for writer " + std::to_string(l.writer);
      return std::nullopt;
    }
    size = std::max(size, l.size);
  }
  const uint64_t nblocks = size / kBlockSize;
  if (image.blocks() < nblocks) {
    *error = "the image has " + std::to_string(image.blocks()) + " blocks, the logs wrote " +
             std::to_string(nblocks);
    return std::nullopt;
  }
  VerifyResult r;
  r.blocks = nblocks;
  auto violate = [&](const std::string& kind, const std::string& what) {
    if (r.counts[kind]++ < o.max_listed) r.violations.push_back({kind, what});
  };
  std::vector<const Write*> held(nblocks, nullptr);
  const Write* latest = nullptr;  // the held write issued last
  std::vector<char> buf(kBlockSize);
  for (uint64_t i = 0; i < nblocks; ++i) {
    if (!image.Read(i, buf.data(), error)) return std::nullopt;
    const Decoded d = DecodeBlock(buf.data());
    const std::string at = "block " + std::to_string(i) + ": ";
    if (d.kind == Decoded::Kind::kZero) continue;
    if (d.kind == Decoded::Kind::kTorn) {
      violate("torn",
              at + "checksum mismatch (parts of several writes?) in a block claiming write " +
                  std::to_string(d.writer) + "/" + std::to_string(d.seq));
      continue;
    }
    if (d.kind == Decoded::Kind::kForeign) {
      violate("foreign", at + "neither zero nor a tvilling-check block");
      continue;
    }
    if (d.block != i) {
      violate("misplaced", at + "holds a block written for block " + std::to_string(d.block));
      continue;
    }
    auto lw = by_writer.find(d.writer);
    if (lw == by_writer.end()) {
      violate("unknown-write",
              at + "written by writer " + std::to_string(d.writer) + ", which no log describes");
      continue;
    }
    auto w = lw->second->writes.find(d.seq);
    if (w == lw->second->writes.end() || w->second.block != i) {
      violate("unknown-write", at + "holds write " + std::to_string(d.writer) + "/" +
                                   std::to_string(d.seq) + ", which the log never issued here");
      continue;
    }
    held[i] = &w->second;
    ++r.held;
    if (latest == nullptr || w->second.issued_ns > latest->issued_ns) latest = &w->second;
  }
  for (const WriterLog& l : logs) {
    for (const auto& [seq, x] : l.writes) {
      if (!x.ok()) continue;
      ++r.completed;
      const Write* h = held[x.block];
      if (h != nullptr && (h == &x || !Precedes(*h, x))) continue;  // present or overwritten
      ++r.missing;
      const std::string holds = h == nullptr ? "nothing (zeros)" : "the older " + Describe(*h);
      if (o.mode == Mode::kSync) {
        violate("missing",
                Describe(x) + " is lost: block " + std::to_string(x.block) + " holds " + holds);
      }
      if (latest != nullptr && Precedes(x, *latest)) {
        ++r.prefix_breaks;
        violate("prefix", Describe(x) + " is lost, but the later " + Describe(*latest) +
                              " is present (not a prefix of the log)");
      }
    }
  }
  if (o.mode == Mode::kAsync && o.loss_bound && r.missing > *o.loss_bound) {
    violate("loss-bound", std::to_string(r.missing) +
                              " completed writes are missing, more than the reported bound of " +
                              std::to_string(*o.loss_bound));
  }
  return r;
}

}  // namespace tvilling::check
