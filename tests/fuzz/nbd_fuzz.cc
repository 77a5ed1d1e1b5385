// nbd_fuzz.cc: libFuzzer target over the NBD protocol code a connection runs: the input is what a
// client sends, byte for byte. It goes through the handshake machine exactly as the server feeds it
// (Need() bytes at a time) and, once in transmission, through request parsing and validation,
// skipping WRITE payloads the way the server does. Checks invariants a connection relies on: reads
// are bounded, replies stay small, an accepted request lies within the export and obeys its
// limits, a read-only export accepts nothing that writes. Seeds: tests/fuzz/make_nbd_corpus.py.
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>

#include "agent/nbd/wire.h"

using namespace tvilling::nbd;

namespace {

class FixedExport : public Export {
 public:
  explicit FixedExport(std::string name, bool ro) {
    info_.name = std::move(name);
    info_.size_bytes = 1 << 20;
    info_.read_only = ro;
  }
  const ExportInfo& info() const override { return info_; }
  void Read(uint64_t, uint32_t, char*, Done) override { std::abort(); }
  void Write(uint64_t, tvilling::storage::Bytes, bool, Done) override { std::abort(); }
  void Flush(Done) override { std::abort(); }
  void Trim(uint64_t, uint32_t, bool, Done) override { std::abort(); }
  void WriteZeroes(uint64_t, uint32_t, bool, bool, Done) override { std::abort(); }

 private:
  ExportInfo info_;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static auto vol = std::make_shared<FixedExport>("vol0", false);
  static auto ro = std::make_shared<FixedExport>("ro", true);
  std::string_view in(reinterpret_cast<const char*>(data), size);
  wire::Handshake hs(
      [](std::string_view n) -> std::shared_ptr<Export> {
        if (n.empty() || n == "vol0") return vol;
        if (n == "ro") return ro;
        return nullptr;
      },
      [] {
        return std::vector<std::shared_ptr<Export>>{vol, ro};
      });
  for (;;) {
    const size_t need = hs.Need();
    if (need == 0 || need > wire::kMaxOptionBytes) std::abort();  // bounded reads only
    if (in.size() < need) return 0;
    wire::Handshake::Step step = hs.Feed(in.substr(0, need));
    in.remove_prefix(need);
    if (step.out.size() > (64u << 10)) std::abort();  // a reply never balloons
    if (step.next == wire::Handshake::Next::kClose) return 0;
    if (step.next == wire::Handshake::Next::kTransmission) {
      if (!hs.chosen()) std::abort();
      break;
    }
  }
  const ExportInfo& info = hs.chosen()->info();
  while (in.size() >= wire::kRequestHeaderBytes) {
    wire::RequestHeader h;
    if (!wire::ParseRequestHeader(in.data(), &h)) return 0;
    in.remove_prefix(wire::kRequestHeaderBytes);
    wire::Verdict v = wire::ValidateRequest(h, info);
    if (v.error == 0) {
      // What the server will do with an accepted request must be within the export.
      if (h.type != wire::kCmdFlush && h.type != wire::kCmdDisc &&
          (h.offset > info.size_bytes || h.length > info.size_bytes - h.offset)) {
        std::abort();
      }
      if ((h.type == wire::kCmdRead || h.type == wire::kCmdWrite) &&
          h.length > info.max_payload_bytes) {
        std::abort();
      }
      if (info.read_only && h.type != wire::kCmdRead && h.type != wire::kCmdFlush &&
          h.type != wire::kCmdDisc) {
        std::abort();
      }
      const uint16_t known = wire::kCmdFlagFua | wire::kCmdFlagNoHole;
      if (h.type != wire::kCmdDisc && (h.flags & ~known) != 0) std::abort();
      if (h.type != wire::kCmdWriteZeroes && h.type != wire::kCmdDisc &&
          (h.flags & wire::kCmdFlagNoHole) != 0) {
        std::abort();
      }
      if (h.type == wire::kCmdDisc) return 0;
    } else if (v.close) {
      if (h.type != wire::kCmdWrite || h.length <= wire::kMaxDiscardBytes) std::abort();
      return 0;
    } else if (v.reason.empty()) {
      std::abort();  // every refusal says why (it is logged)
    }
    if (v.payload_follows) {
      if (in.size() < h.length) return 0;
      in.remove_prefix(h.length);
    }
  }
  return 0;
}
