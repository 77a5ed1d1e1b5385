// repl_probe: dials a replica agent's Replication.Stream with mutual TLS as its primary site would,
// sends a correct Hello, then one bad message, and prints how the replica ended the stream. The
// integration tests (tests/integration/repl_test.py, refuse_malformed_batch and friends) drive it
// to check that a real agent refuses malformed and oversized messages with a clear error and
// survives them.
//
//   repl_probe --target HOST:PORT --ca CA --cert CERT --key KEY [--tls-name NAME]
//              --group G --site SITE --epoch E --history E:LSN[,E:LSN...]
//              --volume NAME:BYTES[,NAME:BYTES...] --last-lsn N [--first-lsn N]
//              [--sender-group-id ID] [--timeout-s S] --case CASE
//
// The Hello must be one the replica accepts as a continuation of its log (STREAM_FROM): the
// caller passes the replica's epoch, its history and last LSN (from `tvillingctl status --json`
// and the test's setup). Records are WRITEs of 4 KiB to volume 0 encoded as the log stores them,
// with their checksums bound to --sender-group-id, so they would verify if nothing else were wrong.
//
// Output, one line each: "decision: KIND start_lsn=N reason=..." for every Decision (the Hello's
// answer, or a refusal), "position: ..." for every Position, then "closed: CODE: MESSAGE" with the
// gRPC status that ended the stream. Exit status: 0 if the replica ended the stream (the caller
// checks the code and message), 1 if it did not end it within --timeout-s (the bad message was
// accepted), 2 for a usage error, 3 if the Hello was not answered with STREAM_FROM.
//
// The cases acks_durable_requested and acks_lazy send good batches instead (the replica's log
// grows by 8 records) and print "done: durable=N" once all are durable: the test
// (async_acks_once_per_batch) looks at the Positions the replica sent for them.
#include <grpcpp/generic/generic_stub.h>
#include <xxhash.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "agent/transport/codec.h"
#include "agent/transport/stream.h"
#include "agent/transport/tls.h"
#include "storage/log_record.h"

namespace {

namespace v1 = ::tvilling::v1;
namespace transport = ::tvilling::transport;
namespace storage = ::tvilling::storage;

constexpr uint32_t kRecordPayload = 4096;

const char* const kCases[] = {
    "bad_checksum",        // a batch checksum (optional) that does not match the records
    "truncated_header",    // records end inside a record header
    "truncated_payload",   // a header's payload size runs past the end of the records
    "record_count",        // record_count says more records than the batch holds
    "unknown_codec",       // codec 7
    "bad_lz4",             // CODEC_LZ4 with bytes that do not decompress
    "bad_zstd",            // CODEC_ZSTD with bytes that do not decompress
    "bad_record",          // no batch checksum (as sent), a record's own checksum is wrong
    "record_epoch",        // records written in another epoch than the batch says
    "record_range",        // a WRITE past the end of its volume (its checksum verifies)
    "record_volume",       // a WRITE to a volume the group does not have (its checksum verifies)
    "gap",                 // first_lsn beyond the replica's last LSN + 1
    "no_records",          // record_count 0
    "oversize_batch",      // 64 MiB + 4 KiB of records (under the gRPC limit, over the batch limit)
    "oversize_claim",      // a small lz4 payload claiming 1 GiB uncompressed
    "oversize_message",    // a message over the gRPC receive limit (kMaxMessageBytes)
    "batch_before_hello",  // a Batch as the first message
    "second_hello",        // a Hello on an accepted stream
    "empty_message",       // a ToReplica with no message set
    "copy_chunk",          // a CopyChunk while no copy is in progress
    "not_protobuf",        // bytes that do not parse as a ToReplica
    // Not refusals: four good batches of two records, each sent once the previous one is durable,
    // with durable_requested set (as to an async peer) or not; then the probe closes the stream.
    "acks_durable_requested",
    "acks_lazy",
};

struct Args {
  std::string target, ca, cert, key, tls_name, group, site, history, volumes, kase;
  uint64_t epoch = 0, last_lsn = 0, first_lsn = 1;
  uint32_t sender_group_id = 1;
  int timeout_s = 30;
};

[[noreturn]] void Usage(const char* msg) {
  fprintf(stderr, "repl_probe: %s\ncases:", msg);
  for (const char* c : kCases) fprintf(stderr, " %s", c);
  fprintf(stderr, "\n");
  exit(2);
}

Args Parse(int argc, char** argv) {
  Args a;
  std::map<std::string, std::string*> strs = {
      {"--target", &a.target},     {"--ca", &a.ca},
      {"--cert", &a.cert},         {"--key", &a.key},
      {"--tls-name", &a.tls_name}, {"--group", &a.group},
      {"--site", &a.site},         {"--history", &a.history},
      {"--volume", &a.volumes},    {"--case", &a.kase}};
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    if (i + 1 >= argc) Usage(("missing value for " + k).c_str());
    std::string v = argv[++i];
    if (auto it = strs.find(k); it != strs.end()) {
      *it->second = v;
    } else if (k == "--epoch") {
      a.epoch = std::stoull(v);
    } else if (k == "--last-lsn") {
      a.last_lsn = std::stoull(v);
    } else if (k == "--first-lsn") {
      a.first_lsn = std::stoull(v);
    } else if (k == "--sender-group-id") {
      a.sender_group_id = static_cast<uint32_t>(std::stoul(v));
    } else if (k == "--timeout-s") {
      a.timeout_s = std::stoi(v);
    } else {
      Usage(("unknown flag " + k).c_str());
    }
  }
  if (a.target.empty() || a.ca.empty() || a.cert.empty() || a.key.empty() || a.group.empty() ||
      a.site.empty() || a.epoch == 0 || a.history.empty() || a.volumes.empty() || a.kase.empty()) {
    Usage(
        "--target, --ca, --cert, --key, --group, --site, --epoch, --history, --volume and --case "
        "are required");
  }
  bool known = false;
  for (const char* c : kCases) known = known || a.kase == c;
  if (!known) Usage(("unknown case " + a.kase).c_str());
  return a;
}

std::vector<std::string> Split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (true) {
    size_t n = s.find(sep, pos);
    out.push_back(s.substr(pos, n == std::string::npos ? std::string::npos : n - pos));
    if (n == std::string::npos) return out;
    pos = n + 1;
  }
}

v1::ToReplica MakeHello(const Args& a) {
  v1::ToReplica m;
  v1::Hello* h = m.mutable_hello();
  h->set_protocol_version(1);
  h->set_group(a.group);
  h->set_sender_site(a.site);
  h->set_epoch(a.epoch);
  for (const std::string& e : Split(a.history, ',')) {
    auto parts = Split(e, ':');
    if (parts.size() != 2) Usage("--history wants EPOCH:FIRST_LSN[,...]");
    v1::EpochStart* es = h->add_history();
    es->set_epoch(std::stoull(parts[0]));
    es->set_first_lsn(std::stoull(parts[1]));
  }
  for (const std::string& v : Split(a.volumes, ',')) {
    auto parts = Split(v, ':');
    if (parts.size() != 2) Usage("--volume wants NAME:BYTES[,...]");
    v1::VolumeInfo* vi = h->add_volumes();
    vi->set_name(parts[0]);
    vi->set_size_bytes(std::stoull(parts[1]));
  }
  h->set_first_lsn(a.first_lsn);
  h->set_last_lsn(a.last_lsn);
  h->set_mode(v1::MODE_ASYNC);
  h->set_sender_group_id(a.sender_group_id);
  return m;
}

// `count` WRITE records from `first_lsn`, as the log stores them: 48-byte header + payload each.
std::string MakeRecords(uint32_t gid, uint64_t first_lsn, uint32_t count, uint64_t epoch,
                        uint64_t offset = 0, uint32_t volume = 0) {
  const uint32_t payload_bytes = kRecordPayload;
  std::string out;
  std::string payload(payload_bytes, '\x5c');
  for (uint32_t i = 0; i < count; ++i) {
    storage::RecordHeader h;
    h.type = storage::RecordType::kWrite;
    h.volume = volume;
    h.epoch = epoch;
    h.offset = offset + static_cast<uint64_t>(i) * 4096;
    h.length = payload_bytes;
    h.payload_size = payload_bytes;
    h.timestamp_ns = 1;
    char hdr[storage::kRecordHeaderSize];
    storage::EncodeRecordHeader(gid, first_lsn + i, h, payload, hdr);
    out.append(hdr, sizeof(hdr));
    out.append(payload);
  }
  return out;
}

// A Batch of `records` as tvillingd sends it (CODEC_NONE, sizes correct, no batch checksum),
// without EncodeBatch's limits so that oversized batches can be built too.
v1::ToReplica RawBatch(uint64_t epoch, uint64_t first_lsn, uint32_t count, std::string records) {
  v1::ToReplica m;
  v1::Batch* b = m.mutable_batch();
  b->set_epoch(epoch);
  b->set_first_lsn(first_lsn);
  b->set_record_count(count);
  b->set_codec(v1::CODEC_NONE);
  b->set_uncompressed_bytes(static_cast<uint32_t>(records.size()));
  b->set_records(std::move(records));
  return m;
}

// The bad message of the case; `next` is the LSN the replica expects.
v1::ToReplica BadMessage(const Args& a, uint64_t next) {
  const uint64_t e = a.epoch;
  const uint32_t gid = a.sender_group_id;
  const std::string& k = a.kase;
  if (k == "bad_checksum") {
    // A sender that sets the optional batch checksum, wrongly.
    const std::string r = MakeRecords(gid, next, 2, e);
    const uint64_t wrong = XXH3_64bits(r.data(), r.size()) ^ 1;
    v1::ToReplica m = RawBatch(e, next, 2, r);
    m.mutable_batch()->set_checksum(wrong);
    return m;
  }
  if (k == "truncated_header") {
    std::string r = MakeRecords(gid, next, 2, e);
    r.resize(kRecordPayload + storage::kRecordHeaderSize + 20);  // record 1 has 20 header bytes
    return RawBatch(e, next, 2, std::move(r));
  }
  if (k == "truncated_payload") {
    std::string r = MakeRecords(gid, next, 1, e);
    r.resize(r.size() - 96);  // the header says 4096 payload bytes; 4000 follow
    return RawBatch(e, next, 1, std::move(r));
  }
  if (k == "record_count") return RawBatch(e, next, 3, MakeRecords(gid, next, 2, e));
  if (k == "unknown_codec") {
    v1::ToReplica m = RawBatch(e, next, 1, MakeRecords(gid, next, 1, e));
    m.mutable_batch()->set_codec(static_cast<v1::Codec>(7));
    return m;
  }
  if (k == "bad_lz4" || k == "bad_zstd") {
    v1::ToReplica m = RawBatch(e, next, 1, MakeRecords(gid, next, 1, e));
    m.mutable_batch()->set_codec(k == "bad_lz4" ? v1::CODEC_LZ4 : v1::CODEC_ZSTD);
    // Neither an lz4 block nor a zstd frame (zstd frames begin 28 b5 2f fd; an lz4 block whose
    // first token asks for 15+255*n literals that are not there).
    m.mutable_batch()->set_records(std::string(300, '\xff'));
    return m;
  }
  if (k == "bad_record") {
    std::string r = MakeRecords(gid, next, 2, e);
    r[r.size() - 1] ^= 0x01;  // the last payload byte of record 1: its record checksum fails
    return RawBatch(e, next, 2, std::move(r));  // ... and no batch checksum, as tvillingd sends
  }
  if (k == "record_epoch") {
    // The batch says epoch e; its records (each verifying on its own) say e + 5.
    return RawBatch(e, next, 2, MakeRecords(gid, next, 2, e + 5));
  }
  if (k == "record_range") {
    // Record 0 writes the last 4 KiB of volume 0, record 1 the 4 KiB after its end.
    const uint64_t size = std::stoull(Split(Split(a.volumes, ',')[0], ':')[1]);
    return RawBatch(e, next, 2, MakeRecords(gid, next, 2, e, size - 4096));
  }
  if (k == "record_volume") {
    return RawBatch(e, next, 1, MakeRecords(gid, next, 1, e, 0, /*volume=*/7));
  }
  if (k == "gap") return RawBatch(e, next + 5, 2, MakeRecords(gid, next + 5, 2, e));
  if (k == "no_records") return RawBatch(e, next, 0, std::string());
  if (k == "oversize_batch") {
    // 64 MiB + 4 KiB + 48 bytes of records in one message of ~64 MiB: under the gRPC limit, so it
    // reaches the codec, whose limit is kMaxBatchBytes.
    const uint32_t n =
        transport::kMaxBatchBytes / (kRecordPayload + storage::kRecordHeaderSize) + 2;
    return RawBatch(e, next, n, MakeRecords(gid, next, n, e));
  }
  if (k == "oversize_claim") {
    v1::ToReplica m = RawBatch(e, next, 1, MakeRecords(gid, next, 1, e));
    m.mutable_batch()->set_codec(v1::CODEC_LZ4);
    m.mutable_batch()->set_uncompressed_bytes(1u << 30);
    return m;
  }
  if (k == "oversize_message") {
    // One message over the receive limit: records of kMaxMessageBytes + 1 MiB.
    const uint32_t n = (static_cast<uint32_t>(transport::kMaxMessageBytes) + (1u << 20)) /
                           (kRecordPayload + storage::kRecordHeaderSize) +
                       1;
    return RawBatch(e, next, n, MakeRecords(gid, next, n, e));
  }
  if (k == "batch_before_hello") return RawBatch(e, next, 1, MakeRecords(gid, next, 1, e));
  if (k == "second_hello") return MakeHello(a);
  if (k == "empty_message") return v1::ToReplica();
  if (k == "copy_chunk") {
    v1::ToReplica m;
    v1::CopyChunk* c = m.mutable_copy_chunk();
    c->set_epoch(e);
    c->set_volume(0);
    c->set_offset(0);
    c->set_length(4096);
    std::string data(4096, '\x11');
    c->set_checksum(XXH3_64bits(data.data(), data.size()));
    c->set_data(std::move(data));
    return m;
  }
  Usage(("unknown case " + k).c_str());
}

// not_protobuf: the stream as raw bytes (gRPC's generic stub), so that the second message can be
// bytes that no ToReplica serializes to. Hello, then the bytes once the Decision arrived.
class RawStream final : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  RawStream(std::shared_ptr<grpc::Channel> channel, const v1::ToReplica& hello, std::string bytes)
      : stub_(std::move(channel)), bytes_(std::move(bytes)) {
    hello_ = Buffer(hello.SerializeAsString());
    stub_.PrepareBidiStreamingCall(&ctx_, "/tvilling.v1.Replication/Stream", {}, this);
    StartWrite(&hello_);
    StartRead(&in_);
    StartCall();
  }
  void OnReadDone(bool ok) override {
    if (!ok) return;
    v1::FromReplica msg;
    std::string raw;
    std::vector<grpc::Slice> slices;
    if (in_.Dump(&slices).ok()) {
      for (const grpc::Slice& sl : slices)
        raw.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
    }
    if (msg.ParseFromString(raw) && msg.has_decision()) {
      printf("decision: kind=%d start_lsn=%llu reason=%s\n",
             static_cast<int>(msg.decision().kind()),
             static_cast<unsigned long long>(msg.decision().start_lsn()),
             msg.decision().reason().c_str());
      fflush(stdout);
      MaybeSendBad(/*decision=*/true, /*hello_written=*/false);
    }
    StartRead(&in_);
  }
  void OnWriteDone(bool ok) override {
    if (ok) MaybeSendBad(/*decision=*/false, /*hello_written=*/true);
  }
  void OnDone(const grpc::Status& s) override {
    std::lock_guard l(mu_);
    status_ = s;
    cv_.notify_all();
  }
  // The status that ended the call, or nullopt if it had not ended by `deadline` (it is cancelled
  // then, and this waits for gRPC to be done with the reactor).
  std::optional<grpc::Status> Wait(std::chrono::steady_clock::time_point deadline) {
    std::unique_lock l(mu_);
    if (cv_.wait_until(l, deadline, [&] { return status_.has_value(); })) return status_;
    l.unlock();
    ctx_.TryCancel();
    l.lock();
    cv_.wait(l, [&] { return status_.has_value(); });
    return std::nullopt;
  }

 private:
  // One write at a time: the bytes go once the Hello is written and its Decision arrived.
  void MaybeSendBad(bool decision, bool hello_written) {
    {
      std::lock_guard l(mu_);
      decision_ = decision_ || decision;
      hello_written_ = hello_written_ || hello_written;
      if (!decision_ || !hello_written_ || sent_) return;
      sent_ = true;
    }
    bad_ = Buffer(bytes_);
    fprintf(stderr, "repl_probe: sending not_protobuf (%zu bytes)\n", bytes_.size());
    StartWrite(&bad_);
  }
  static grpc::ByteBuffer Buffer(const std::string& s) {
    grpc::Slice slice(s);
    return grpc::ByteBuffer(&slice, 1);
  }
  grpc::GenericStub stub_;
  grpc::ClientContext ctx_;
  std::string bytes_;
  grpc::ByteBuffer hello_, bad_, in_;
  bool decision_ = false, hello_written_ = false, sent_ = false;
  std::mutex mu_;
  std::condition_variable cv_;
  std::optional<grpc::Status> status_;
};

const char* CodeName(absl::StatusCode c) {
  static std::string s;
  s = absl::StatusCodeToString(c);
  return s.c_str();
}

const char* KindName(v1::Decision::Kind k) {
  switch (k) {
    case v1::Decision::STREAM_FROM:
      return "STREAM_FROM";
    case v1::Decision::FULL_COPY:
      return "FULL_COPY";
    case v1::Decision::REFUSE:
      return "REFUSE";
    default:
      return "UNSPECIFIED";
  }
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = Parse(argc, argv);
  auto tls = transport::LoadTls({a.ca, a.cert, a.key});
  if (!tls.ok()) {
    fprintf(stderr, "repl_probe: %s\n", std::string(tls.status().message()).c_str());
    return 2;
  }
  // The agent's own channel settings (transport::MakeChannel) but with a send limit above the
  // replica's receive limit, so that an oversized message reaches the replica.
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(transport::kMaxMessageBytes * 2);
  args.SetMaxReceiveMessageSize(transport::kMaxMessageBytes);
  if (!a.tls_name.empty()) args.SetSslTargetNameOverride(a.tls_name);
  auto channel = grpc::CreateCustomChannel(a.target, transport::ChannelCredentials(*tls), args);

  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(a.timeout_s);
  if (a.kase == "not_protobuf") {
    // Field 1 as wire type 7, which does not exist: no protobuf parser accepts it.
    RawStream raw(channel, MakeHello(a), std::string("\x0f\xff\xff\xff\xff", 5));
    std::optional<grpc::Status> st = raw.Wait(deadline + std::chrono::seconds(1));
    if (!st) {
      printf("closed: (not closed within %d s: the message was accepted)\n", a.timeout_s);
      return 1;
    }
    printf("closed: %s: %s\n",
           CodeName(static_cast<absl::StatusCode>(static_cast<int>(st->error_code()))),
           st->error_message().c_str());
    return 0;
  }

  std::mutex mu;
  std::condition_variable cv;
  std::optional<v1::Decision> decision;
  std::optional<absl::Status> closed;
  uint64_t durable = 0;
  auto stream = transport::ClientStream::Open(
      channel,
      [&](v1::FromReplica msg) {
        std::lock_guard l(mu);
        if (msg.has_decision()) {
          const v1::Decision& d = msg.decision();
          printf("decision: %s start_lsn=%llu epoch=%llu reason=%s\n", KindName(d.kind()),
                 static_cast<unsigned long long>(d.start_lsn()),
                 static_cast<unsigned long long>(d.epoch()), d.reason().c_str());
          decision = d;
        } else if (msg.has_position()) {
          const v1::Position& p = msg.position();
          printf("position: received=%llu durable=%llu applied=%llu\n",
                 static_cast<unsigned long long>(p.received_lsn()),
                 static_cast<unsigned long long>(p.durable_lsn()),
                 static_cast<unsigned long long>(p.applied_lsn()));
          durable = std::max<uint64_t>(durable, p.durable_lsn());
        }
        fflush(stdout);
        cv.notify_all();
      },
      [&](absl::Status st) {
        std::lock_guard l(mu);
        closed = std::move(st);
        cv.notify_all();
      });

  uint64_t next = a.last_lsn + 1;
  if (a.kase != "batch_before_hello") {
    stream->Send(MakeHello(a));
    std::unique_lock l(mu);
    cv.wait_until(l, deadline, [&] { return decision.has_value() || closed.has_value(); });
    if (!decision || decision->kind() != v1::Decision::STREAM_FROM) {
      if (closed) {
        printf("closed: %s: %s\n", CodeName(closed->code()),
               std::string(closed->message()).c_str());
      }
      fprintf(stderr, "repl_probe: the Hello was not answered with STREAM_FROM\n");
      l.unlock();
      stream->Close(absl::CancelledError("probe done"));
      return 3;
    }
    next = decision->start_lsn();
  }

  if (a.kase.starts_with("acks_")) {
    for (int i = 0; i < 4; ++i, next += 2) {
      v1::ToReplica m =
          RawBatch(a.epoch, next, 2, MakeRecords(a.sender_group_id, next, 2, a.epoch));
      m.mutable_batch()->set_durable_requested(a.kase == "acks_durable_requested");
      stream->Send(std::move(m));
      std::unique_lock l(mu);
      if (!cv.wait_until(l, deadline, [&] { return durable >= next + 1 || closed.has_value(); }) ||
          closed) {
        printf("closed: %s\n",
               closed ? std::string(closed->message()).c_str() : "(batch not durable in time)");
        fflush(stdout);
        return 1;
      }
    }
    printf("done: durable=%llu\n", static_cast<unsigned long long>(next - 1));
    fflush(stdout);
    stream->Close(absl::CancelledError("probe done"));
    return 0;
  }

  v1::ToReplica bad = BadMessage(a, next);
  fprintf(stderr, "repl_probe: sending %s (%zu bytes)\n", a.kase.c_str(), bad.ByteSizeLong());
  stream->Send(std::move(bad));
  std::unique_lock l(mu);
  cv.wait_until(l, deadline, [&] { return closed.has_value(); });
  if (!closed) {
    printf("closed: (not closed within %d s: the message was accepted)\n", a.timeout_s);
    fflush(stdout);
    l.unlock();
    stream->Close(absl::CancelledError("probe done"));
    return 1;
  }
  printf("closed: %s: %s\n", CodeName(closed->code()), std::string(closed->message()).c_str());
  fflush(stdout);
  return closed->ok() ? 1 : 0;
}
