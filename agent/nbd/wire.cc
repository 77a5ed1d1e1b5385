// wire.cc: the NBD handshake state machine and request validation (see wire.h).
#include "agent/nbd/wire.h"

#include <fmt/format.h>

namespace tvilling::nbd::wire {
namespace {

void Put16(std::string* s, uint16_t v) {
  s->push_back(static_cast<char>(v >> 8));
  s->push_back(static_cast<char>(v));
}
void Put32(std::string* s, uint32_t v) {
  for (int i = 3; i >= 0; --i) s->push_back(static_cast<char>(v >> (8 * i)));
}
void Put64(std::string* s, uint64_t v) {
  for (int i = 7; i >= 0; --i) s->push_back(static_cast<char>(v >> (8 * i)));
}
uint64_t Get(const char* p, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

}  // namespace

const char* OptionName(uint32_t o) {
  switch (o) {
    case kOptExportName:
      return "EXPORT_NAME";
    case kOptAbort:
      return "ABORT";
    case kOptList:
      return "LIST";
    case kOptStartTls:
      return "STARTTLS";
    case kOptInfo:
      return "INFO";
    case kOptGo:
      return "GO";
    case kOptStructuredReply:
      return "STRUCTURED_REPLY";
    case kOptListMetaContext:
      return "LIST_META_CONTEXT";
    case kOptSetMetaContext:
      return "SET_META_CONTEXT";
    case kOptExtendedHeaders:
      return "EXTENDED_HEADERS";
    default:
      return "unknown";
  }
}

const char* CommandName(uint16_t type) {
  switch (type) {
    case kCmdRead:
      return "READ";
    case kCmdWrite:
      return "WRITE";
    case kCmdDisc:
      return "DISC";
    case kCmdFlush:
      return "FLUSH";
    case kCmdTrim:
      return "TRIM";
    case kCmdWriteZeroes:
      return "WRITE_ZEROES";
    case kCmdCache:
      return "CACHE";
    case kCmdBlockStatus:
      return "BLOCK_STATUS";
    default:
      return "unknown";
  }
}

uint16_t TransmissionFlags(const ExportInfo& info) {
  uint16_t f = kTxHasFlags | kTxSendFlush;
  if (info.read_only) {
    f |= kTxReadOnly;
  } else {
    if (info.can_fua) f |= kTxSendFua;
    if (info.can_trim) f |= kTxSendTrim;
    if (info.can_write_zeroes) f |= kTxSendWriteZeroes;
  }
  if (info.can_multi_conn) f |= kTxCanMultiConn;
  return f;
}

std::string EncodeOptionReply(uint32_t option, uint32_t type, std::string_view data) {
  std::string s;
  s.reserve(20 + data.size());
  Put64(&s, kOptReplyMagic);
  Put32(&s, option);
  Put32(&s, type);
  Put32(&s, static_cast<uint32_t>(data.size()));
  s.append(data);
  return s;
}

std::string ParseInfoRequest(std::string_view data, InfoRequest* out) {
  if (data.size() < 6) return "INFO/GO data shorter than 6 bytes";
  const uint64_t name_len = Get(data.data(), 4);
  if (name_len > data.size() - 6) return "INFO/GO name length does not fit the option";
  if (name_len > kMaxStringBytes) return "INFO/GO name longer than 4096 bytes";
  out->name = data.substr(4, name_len);
  const size_t at = 4 + name_len;
  const uint64_t n = Get(data.data() + at, 2);
  if (data.size() != at + 2 + 2 * n) {
    return "INFO/GO information request count does not fit the option";
  }
  out->requests.clear();
  for (uint64_t i = 0; i < n; ++i) {
    const auto r = static_cast<uint16_t>(Get(data.data() + at + 2 + 2 * i, 2));
    // The client MUST NOT repeat one; if it does, answer once (this also bounds the reply).
    bool seen = false;
    for (uint16_t x : out->requests) seen = seen || x == r;
    if (!seen && out->requests.size() < 16) out->requests.push_back(r);
  }
  return {};
}

std::string EncodeInfoReplies(uint32_t option, const ExportInfo& info,
                              const std::vector<uint16_t>& requests) {
  std::string out, d;
  Put16(&d, kInfoExport);
  Put64(&d, info.size_bytes);
  Put16(&d, TransmissionFlags(info));
  out += EncodeOptionReply(option, kRepInfo, d);
  for (uint16_t r : requests) {
    d.clear();
    switch (r) {
      case kInfoName:
        Put16(&d, kInfoName);
        d += info.name;
        break;
      case kInfoDescription:
        Put16(&d, kInfoDescription);
        d += info.description;
        break;
      case kInfoBlockSize:
        Put16(&d, kInfoBlockSize);
        Put32(&d, info.min_block_bytes);
        Put32(&d, info.preferred_block_bytes);
        Put32(&d, info.max_payload_bytes);
        break;
      default:
        continue;  // unknown, or EXPORT (already sent): ignored, as the spec says
    }
    out += EncodeOptionReply(option, kRepInfo, d);
  }
  return out;
}

std::string EncodeExportNameReply(const ExportInfo& info, bool no_zeroes) {
  std::string s;
  Put64(&s, info.size_bytes);
  Put16(&s, TransmissionFlags(info));
  if (!no_zeroes) s.append(124, '\0');
  return s;
}

std::string EncodeListReply(const ExportInfo& info) {
  std::string d;
  Put32(&d, static_cast<uint32_t>(info.name.size()));
  d += info.name;
  d += info.description;
  return EncodeOptionReply(kOptList, kRepServer, d);
}

Handshake::Handshake(ExportLookup lookup, ExportList list)
    : lookup_(std::move(lookup)), list_(std::move(list)) {}

std::string Handshake::Greeting() {
  std::string s;
  Put64(&s, kNbdMagic);
  Put64(&s, kOptMagic);
  Put16(&s, kFlagFixedNewstyle | kFlagNoZeroes);
  return s;
}

Handshake::Step Handshake::Feed(std::string_view in) {
  Step step;
  switch (state_) {
    case State::kClientFlags: {
      const uint32_t flags = static_cast<uint32_t>(Get(in.data(), 4));
      if ((flags & ~(kClientFlagFixedNewstyle | kClientFlagNoZeroes)) != 0) {
        step.next = Next::kClose;
        step.reason = fmt::format("unknown client flags {:#x}", flags);
        return step;
      }
      if ((flags & kClientFlagFixedNewstyle) == 0) {
        step.next = Next::kClose;
        step.reason = "client does not speak fixed newstyle";
        return step;
      }
      no_zeroes_ = (flags & kClientFlagNoZeroes) != 0;
      state_ = State::kOptionHeader;
      need_ = 16;
      return step;
    }
    case State::kOptionHeader: {
      if (Get(in.data(), 8) != kOptMagic) {
        step.next = Next::kClose;
        step.reason = "bad option magic";
        return step;
      }
      option_ = static_cast<uint32_t>(Get(in.data() + 8, 4));
      const uint32_t len = static_cast<uint32_t>(Get(in.data() + 12, 4));
      if (++options_seen_ > kMaxOptions) {
        step.next = Next::kClose;
        step.reason = fmt::format("more than {} options", kMaxOptions);
        return step;
      }
      if (len > kMaxOptionBytes) {
        step.next = Next::kClose;
        step.reason = fmt::format("option {} ({}) announces {} bytes of data (limit {})", option_,
                                  OptionName(option_), len, kMaxOptionBytes);
        return step;
      }
      if (len == 0) return OnOption({});
      state_ = State::kOptionData;
      need_ = len;
      return step;
    }
    case State::kOptionData:
      return OnOption(in);
    case State::kDone:
      break;
  }
  step.next = Next::kClose;
  step.reason = "handshake already finished";
  return step;
}

Handshake::Step Handshake::OnOption(std::string_view data) {
  Step step;
  state_ = State::kOptionHeader;
  need_ = 16;
  switch (option_) {
    case kOptExportName: {
      // No way to answer an error: an unknown export closes the connection (the spec's rule).
      chosen_ = data.size() <= kMaxStringBytes ? lookup_(data) : nullptr;
      if (!chosen_) {
        step.next = Next::kClose;
        step.reason = fmt::format("EXPORT_NAME of unknown export '{}'",
                                  data.substr(0, std::min<size_t>(data.size(), 64)));
        return step;
      }
      step.out = EncodeExportNameReply(chosen_->info(), no_zeroes_);
      step.next = Next::kTransmission;
      state_ = State::kDone;
      need_ = 0;
      return step;
    }
    case kOptAbort:
      step.out = EncodeOptionReply(option_, kRepAck, {});
      step.next = Next::kClose;
      step.reason = "client aborted";
      return step;
    case kOptList: {
      if (!data.empty()) {
        step.out = EncodeOptionReply(option_, kRepErrInvalid, "LIST takes no data");
        return step;
      }
      for (const auto& e : list_()) step.out += EncodeListReply(e->info());
      step.out += EncodeOptionReply(option_, kRepAck, {});
      return step;
    }
    case kOptInfo:
    case kOptGo:
      return InfoOrGo(data, option_ == kOptGo);
    case kOptStartTls:
      step.out = EncodeOptionReply(option_, kRepErrPolicy, "TLS is not offered on this listener");
      return step;
    default:
      // STRUCTURED_REPLY, meta contexts, extended headers and anything unknown: simple replies
      // only.
      step.out = EncodeOptionReply(option_, kRepErrUnsup, {});
      return step;
  }
}

Handshake::Step Handshake::InfoOrGo(std::string_view data, bool go) {
  Step step;
  InfoRequest req;
  if (std::string why = ParseInfoRequest(data, &req); !why.empty()) {
    step.out = EncodeOptionReply(option_, kRepErrInvalid, why);
    return step;
  }
  std::shared_ptr<Export> e = lookup_(req.name);
  if (!e) {
    step.out =
        EncodeOptionReply(option_, kRepErrUnknown, fmt::format("no export named '{}'", req.name));
    return step;
  }
  step.out = EncodeInfoReplies(option_, e->info(), req.requests);
  step.out += EncodeOptionReply(option_, kRepAck, {});
  if (go) {
    chosen_ = std::move(e);
    step.next = Next::kTransmission;
    state_ = State::kDone;
    need_ = 0;
  }
  return step;
}

bool ParseRequestHeader(const char in[kRequestHeaderBytes], RequestHeader* out) {
  if (Get(in, 4) != kRequestMagic) return false;
  out->flags = static_cast<uint16_t>(Get(in + 4, 2));
  out->type = static_cast<uint16_t>(Get(in + 6, 2));
  out->cookie = Get(in + 8, 8);
  out->offset = Get(in + 16, 8);
  out->length = static_cast<uint32_t>(Get(in + 24, 4));
  return true;
}

Verdict ValidateRequest(const RequestHeader& h, const ExportInfo& info) {
  Verdict v;
  const bool is_write = h.type == kCmdWrite;
  v.payload_follows = is_write;
  if (h.type == kCmdDisc) return v;  // no reply exists to carry an error: just disconnect
  auto refuse = [&](uint32_t error, std::string reason) {
    v.error = error;
    v.reason = std::move(reason);
    if (is_write && h.length > kMaxDiscardBytes) v.close = true;
    return v;
  };
  // FUA is valid on every command once advertised (the spec: the server MUST accept it). A
  // read-only export does not advertise it, but a WRITE+FUA there deserves EPERM, not EINVAL.
  uint16_t allowed = info.can_fua ? kCmdFlagFua : 0;
  switch (h.type) {
    case kCmdRead:
    case kCmdFlush:
    case kCmdWrite:
    case kCmdTrim:
      break;
    case kCmdWriteZeroes:
      allowed |= kCmdFlagNoHole;
      break;
    default:
      return refuse(kEinval, fmt::format("unknown command {}", h.type));
  }
  if ((h.flags & ~allowed) != 0) {
    return refuse(kEinval, fmt::format("flags {:#x} not allowed on {}", h.flags & ~allowed,
                                       CommandName(h.type)));
  }
  if (h.type == kCmdFlush) {
    if (h.offset != 0 || h.length != 0) return refuse(kEinval, "FLUSH with offset/length");
    return v;
  }
  const bool mutates = h.type != kCmdRead;
  if (mutates && info.read_only) {
    return refuse(kEperm, fmt::format("{} on read-only export {}", CommandName(h.type), info.name));
  }
  if ((h.type == kCmdTrim && !info.can_trim) ||
      (h.type == kCmdWriteZeroes && !info.can_write_zeroes)) {
    return refuse(kEinval, fmt::format("{} was not advertised", CommandName(h.type)));
  }
  if ((h.type == kCmdRead || is_write) && h.length > info.max_payload_bytes) {
    return refuse(kEinval, fmt::format("{} of {} bytes exceeds the maximum payload of {}",
                                       CommandName(h.type), h.length, info.max_payload_bytes));
  }
  if (h.offset > info.size_bytes || h.length > info.size_bytes - h.offset) {
    const bool enospc = is_write || h.type == kCmdWriteZeroes;
    return refuse(enospc ? kEnospc : kEinval,
                  fmt::format("{} {}+{} is beyond the end of export {} ({} bytes)",
                              CommandName(h.type), h.offset, h.length, info.name, info.size_bytes));
  }
  if (info.min_block_bytes > 1 &&
      (h.offset % info.min_block_bytes != 0 || h.length % info.min_block_bytes != 0)) {
    return refuse(kEinval, fmt::format("{} {}+{} is not aligned to {} bytes", CommandName(h.type),
                                       h.offset, h.length, info.min_block_bytes));
  }
  return v;
}

void EncodeSimpleReply(uint32_t error, uint64_t cookie, char out[kSimpleReplyBytes]) {
  auto put = [&](int at, uint64_t v, int n) {
    for (int i = n - 1; i >= 0; --i) {
      out[at + i] = static_cast<char>(v & 0xff);
      v >>= 8;
    }
  };
  put(0, kSimpleReplyMagic, 4);
  put(4, error, 4);
  put(8, cookie, 8);
}

uint32_t ErrorFromStatus(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kOk:
      return 0;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
      return kEinval;
    case absl::StatusCode::kResourceExhausted:
      return kEnospc;
    case absl::StatusCode::kPermissionDenied:
    case absl::StatusCode::kFailedPrecondition:
      return kEperm;
    case absl::StatusCode::kUnavailable:
      return kEshutdown;
    case absl::StatusCode::kUnimplemented:
      return kEnotsup;
    default:
      return kEio;
  }
}

}  // namespace tvilling::nbd::wire
