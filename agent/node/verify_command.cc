// verify_command.cc: Control.Verify in the agent (verify_command.h).
#include "agent/node/verify_command.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <google/protobuf/util/delimited_message_util.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

namespace tvilling::node {

VerifyRegistry::VerifyRegistry(std::filesystem::path file) : file_(std::move(file)) {
  std::ifstream in(file_, std::ios::binary);
  if (!in) return;  // no verify finished yet
  std::stringstream buf;
  buf << in.rdbuf();
  const std::string data = buf.str();
  google::protobuf::io::ArrayInputStream stream(data.data(), static_cast<int>(data.size()));
  size_t n = 0;
  for (;;) {
    v1::VerifyProgress p;
    bool clean_eof = false;
    if (!google::protobuf::util::ParseDelimitedFromZeroCopyStream(&p, &stream, &clean_eof)) {
      if (!clean_eof) {
        spdlog::warn(
            "verify: {} does not parse after {} result(s) (damaged?): the rest of it is ignored "
            "and the file is rewritten after the next verify",
            file_.string(), n);
      }
      break;
    }
    if (p.group().empty() || p.peer().empty() || p.status().state() == "running") continue;
    last_[{p.group(), p.peer()}] = p.status();
    finished_[{p.group(), p.peer()}] = p.status();
    ++n;
  }
}

void VerifyRegistry::SaveLocked() {
  if (file_.empty()) return;
  std::string out;
  {
    google::protobuf::io::StringOutputStream stream(&out);
    for (const auto& [key, status] : finished_) {
      v1::VerifyProgress p;
      p.set_group(key.first);
      p.set_peer(key.second);
      *p.mutable_status() = status;
      p.set_done(true);
      google::protobuf::util::SerializeDelimitedToZeroCopyStream(p, &stream);
    }
  }
  const std::string tmp = file_.string() + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  bool ok = fd >= 0;
  for (size_t off = 0; ok && off < out.size();) {
    const ssize_t w = ::write(fd, out.data() + off, out.size() - off);
    if (w < 0 && errno == EINTR) continue;
    ok = w > 0;
    if (ok) off += static_cast<size_t>(w);
  }
  ok = ok && ::fsync(fd) == 0;
  const int err = errno;
  if (fd >= 0) ::close(fd);
  if (ok && ::rename(tmp.c_str(), file_.c_str()) == 0) return;
  spdlog::warn("verify: cannot save the results to {}: {} (they are kept in memory)",
               file_.string(), std::strerror(ok ? errno : err));
  ::unlink(tmp.c_str());
}

void VerifyRegistry::Fill(v1::GroupStatus* group) const {
  std::lock_guard lock(mu_);
  for (v1::PeerStatus& p : *group->mutable_peers()) {
    auto it = last_.find({group->name(), p.peer()});
    if (it != last_.end()) *p.mutable_verify() = it->second;
  }
}

void VerifyRegistry::Update(const std::string& group, const std::string& peer,
                            const v1::VerifyStatus& status) {
  std::lock_guard lock(mu_);
  last_[{group, peer}] = status;
  if (status.state() == "running") return;
  finished_[{group, peer}] = status;
  SaveLocked();
}

bool VerifyRegistry::TryBegin(const std::string& group) {
  std::lock_guard lock(mu_);
  return running_.insert(group).second;
}

void VerifyRegistry::End(const std::string& group) {
  std::lock_guard lock(mu_);
  running_.erase(group);
}

namespace {

std::string Summary(const v1::VerifyStatus& st) {
  std::string s = fmt::format(
      "{}: {} of {} chunk(s) compared, {} mismatching ({} bytes), {} "
      "unverified",
      st.state(), st.compared_chunks(), st.total_chunks(), st.mismatch_chunks(),
      st.mismatch_bytes(), st.unverified_chunks());
  for (int i = 0; i < st.mismatches_size() && i < 8; ++i) {
    const v1::VerifyRange& r = st.mismatches(i);
    s += fmt::format("{} {}@{}+{}", i == 0 ? "; ranges" : ",", r.volume(), r.offset(), r.length());
  }
  if (st.mismatches_size() > 8) s += fmt::format(" and {} more", st.mismatches_size() - 8);
  if (!st.resync().empty()) s += "; resync " + st.resync();
  if (!st.error().empty()) s += "; " + st.error();
  return s;
}

}  // namespace

absl::Status ServeVerify(const VerifyCommandContext& ctx, const v1::VerifyRequest& req,
                         const std::function<bool(const v1::VerifyProgress&)>& send) {
  const ops::Config& config = *ctx.config;
  const ops::GroupConfig* group = nullptr;
  for (const ops::GroupConfig& g : config.groups) {
    if (g.name == req.group()) group = &g;
  }
  if (group == nullptr || ctx.controller == nullptr) {
    return absl::NotFoundError(
        fmt::format("group {} is not configured on site {}", req.group(), config.agent.site));
  }
  GroupController& c = *ctx.controller;
  if (c.role() != GroupRole::kPrimary) {
    return absl::FailedPreconditionError(
        fmt::format("site {} is not the primary of group {} ({}): run verify on its primary",
                    config.agent.site, req.group(), GroupRoleName(c.role())));
  }
  if (group->peers.empty() || ctx.peer == nullptr) {
    return absl::FailedPreconditionError(
        fmt::format("group {} has no peers: nothing to compare with", req.group()));
  }
  std::vector<std::string> peers;
  for (const ops::PeerConfig& p : group->peers) {
    if (req.peer().empty() || p.site == req.peer()) peers.push_back(p.site);
  }
  if (peers.empty()) {
    return absl::NotFoundError(
        fmt::format("site {} is not a peer of group {}", req.peer(), req.group()));
  }
  VerifyJob job;
  job.group = req.group();
  job.site = config.agent.site;
  job.epoch = c.epoch();
  for (const ops::VolumeConfig& v : group->volumes) job.volume_names.push_back(v.name);
  if (!req.volume().empty()) {
    for (size_t i = 0; i < job.volume_names.size(); ++i) {
      if (job.volume_names[i] == req.volume()) job.volume = static_cast<uint32_t>(i);
    }
    if (!job.volume) {
      return absl::NotFoundError(
          fmt::format("volume {} is not in group {}", req.volume(), req.group()));
    }
  }
  job.rate_bytes_per_s =
      req.rate_bytes_per_s() == 0 ? kDefaultVerifyRateBytesPerS : req.rate_bytes_per_s();
  job.resync = req.resync();
  if (req.resync_timeout_ms() > 0) {
    job.resync_timeout = std::chrono::milliseconds(req.resync_timeout_ms());
  }
  const uint64_t epoch = job.epoch;
  job.still_primary = [&c, epoch] { return c.role() == GroupRole::kPrimary && c.epoch() == epoch; };
  if (!ctx.registry->TryBegin(req.group())) {
    return absl::FailedPreconditionError(
        fmt::format("a verify of group {} is already running", req.group()));
  }
  const std::string who =
      fmt::format("{} (uid {})", req.user().empty() ? "?" : req.user(), req.uid());
  spdlog::info("group {}: verify by {} of {} peer(s){}{}", req.group(), who, peers.size(),
               req.volume().empty() ? "" : ", volume " + req.volume(),
               req.resync() ? ", with resync" : "");
  bool client_gone = false;
  for (const std::string& peer : peers) {
    job.peer = peer;
    job.peer_status = [&c, peer]() -> std::optional<v1::PeerStatus> {
      v1::GroupStatus gs;
      c.FillStatus(&gs);
      for (const v1::PeerStatus& p : gs.peers()) {
        if (p.peer() == peer) return p;
      }
      return std::nullopt;
    };
    const auto progress = [&](const v1::VerifyStatus& st) {
      ctx.registry->Update(req.group(), peer, st);
      v1::VerifyProgress p;
      p.set_group(req.group());
      p.set_peer(peer);
      *p.mutable_status() = st;
      if (!send(p)) client_gone = true;
      return !client_gone;
    };
    v1::VerifyStatus result;
    if (client_gone) {
      result.set_state("cancelled");
      result.set_error("the client went away");
    } else {
      result = RunVerify(c.runtime(), *ctx.peer, job, progress);
    }
    ctx.registry->Update(req.group(), peer, result);
    v1::AuditRecord rec;
    rec.set_group(req.group());
    rec.set_action(req.resync() ? "verify-resync" : "verify");
    rec.set_user(req.user());
    rec.set_uid(req.uid());
    rec.set_outcome(result.state());
    rec.set_detail(fmt::format("peer {}: {}", peer, Summary(result)));
    if (ctx.audit != nullptr) {
      if (absl::Status st = ctx.audit->Record(rec); !st.ok()) {
        spdlog::error("audit: {}", std::string(st.message()));
      }
    }
    v1::VerifyProgress done;
    done.set_group(req.group());
    done.set_peer(peer);
    done.set_done(true);
    *done.mutable_status() = result;
    if (!client_gone) send(done);
  }
  ctx.registry->End(req.group());
  return absl::OkStatus();
}

}  // namespace tvilling::node
