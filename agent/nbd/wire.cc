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
    default:
      return "unknown";
  }
}

}  // namespace

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
      const ExportInfo& info = chosen_->info();
      Put64(&step.out, info.size_bytes);
      Put16(&step.out, TransmissionFlags(info));
      if (!no_zeroes_) step.out.append(124, '\0');
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
      for (const auto& e : list_()) {
        std::string d;
        Put32(&d, static_cast<uint32_t>(e->info().name.size()));
        d += e->info().name;
        d += e->info().description;
        step.out += EncodeOptionReply(option_, kRepServer, d);
      }
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
  auto invalid = [&](std::string_view why) {
    step.out = EncodeOptionReply(option_, kRepErrInvalid, why);
    return step;
  };
  if (data.size() < 6) return invalid("INFO/GO data too short");
  const uint32_t name_len = static_cast<uint32_t>(Get(data.data(), 4));
  if (name_len > kMaxStringBytes || data.size() < 4ull + name_len + 2) {
    return invalid("INFO/GO name length does not fit the option");
  }
  const std::string_view name = data.substr(4, name_len);
  const uint16_t n = static_cast<uint16_t>(Get(data.data() + 4 + name_len, 2));
  if (data.size() != 4ull + name_len + 2 + 2ull * n) {
    return invalid("INFO/GO information request count does not fit the option");
  }
  std::vector<uint16_t> requested;
  for (uint16_t i = 0; i < n; ++i) {
    requested.push_back(static_cast<uint16_t>(Get(data.data() + 6 + name_len + 2 * i, 2)));
  }
  std::shared_ptr<Export> e = lookup_(name);
  if (!e) {
    step.out =
        EncodeOptionReply(option_, kRepErrUnknown, fmt::format("no export named '{}'", name));
    return step;
  }
  chosen_ = e;
  step.out = InfoReplies(requested);
  step.out += EncodeOptionReply(option_, kRepAck, {});
  if (go) {
    step.next = Next::kTransmission;
    state_ = State::kDone;
    need_ = 0;
  } else {
    chosen_.reset();
  }
  return step;
}

std::string Handshake::InfoReplies(const std::vector<uint16_t>& requested) const {
  const ExportInfo& info = chosen_->info();
  std::string out, d;
  Put16(&d, kInfoExport);
  Put64(&d, info.size_bytes);
  Put16(&d, TransmissionFlags(info));
  out += EncodeOptionReply(option_, kRepInfo, d);
  for (uint16_t r : requested) {
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
        continue;  // unknown or already sent (EXPORT): ignored, as the spec says
    }
    out += EncodeOptionReply(option_, kRepInfo, d);
  }
  return out;
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
  auto refuse = [&](uint32_t error, std::string reason) {
    v.error = error;
    v.reason = std::move(reason);
    if (is_write && h.length > kMaxDiscardBytes) v.close = true;
    return v;
  };
  uint16_t allowed = 0;
  switch (h.type) {
    case kCmdRead:
    case kCmdFlush:
    case kCmdDisc:
      break;
    case kCmdWrite:
    case kCmdTrim:
      allowed = kCmdFlagFua;
      break;
    case kCmdWriteZeroes:
      allowed = kCmdFlagFua | kCmdFlagNoHole;
      break;
    default:
      return refuse(kEinval, fmt::format("unknown command {}", h.type));
  }
  if ((h.flags & ~allowed) != 0) {
    return refuse(kEinval,
                  fmt::format("flags {:#x} not allowed on {}", h.flags, CommandName(h.type)));
  }
  if ((h.flags & kCmdFlagFua) && !info.can_fua) {
    return refuse(kEinval, "FUA was not advertised");
  }
  if (h.type == kCmdFlush || h.type == kCmdDisc) {
    if (h.offset != 0 || h.length != 0) {
      return refuse(kEinval, fmt::format("{} with offset/length", CommandName(h.type)));
    }
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
    return refuse(mutates ? kEnospc : kEinval,
                  fmt::format("{} {}+{} is beyond the end of export {} ({} bytes)",
                              CommandName(h.type), h.offset, h.length, info.name, info.size_bytes));
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
