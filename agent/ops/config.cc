// config.cc: reads tvillingd's TOML config (toml++) into plain structs and validates it.
//
// Two passes. The reader walks the TOML tree: unknown keys, wrong types, negative numbers and sizes
// that do not parse; it records where each key was so that later messages can say line:col. Then
// Validate checks the rules between values and fills defaults. Each pass reports every problem it
// finds; the second runs only if the first found none (a half-read config would give noise).
// toml++ throws toml::parse_error; it is caught here and never leaves this file.
#include "agent/ops/config.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <toml++/toml.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <map>
#include <set>

namespace tvilling::ops {
namespace {

namespace fs = std::filesystem;

struct Position {
  uint32_t line = 0;  // 1-based; 0 = unknown
  uint32_t column = 0;
};

// Where each key path ("group[0].volume[1].size") was found in the file.
using Positions = std::map<std::string, Position, std::less<>>;

// "group[0].volume[1].size" -> "group[0].volume[1]" -> "group[0]" -> "group" -> "".
std::string_view ParentKey(std::string_view key) {
  const size_t cut = key.find_last_of(".[");
  return cut == std::string_view::npos ? std::string_view() : key.substr(0, cut);
}

std::string JoinKey(std::string_view path, std::string_view key) {
  return path.empty() ? std::string(key) : fmt::format("{}.{}", path, key);
}

// Collects messages `<source>:<line>:<col>: <key>: <what>`; returns them as one InvalidArgument.
class Errors {
 public:
  Errors(std::string_view source, const Positions* positions)
      : source_(source.empty() ? "<config>" : source), positions_(positions) {}

  void Add(std::string_view key, std::string_view what) {
    ++count_;
    if (lines_.size() >= kMaxLines) return;
    const Position pos = Find(key);
    if (pos.line == 0) {
      lines_.push_back(fmt::format("{}: {}: {}", source_, key, what));
    } else {
      lines_.push_back(fmt::format("{}:{}:{}: {}: {}", source_, pos.line, pos.column, key, what));
    }
  }

  [[nodiscard]] bool empty() const { return count_ == 0; }

  [[nodiscard]] absl::Status ToStatus() const {
    if (count_ == 0) return absl::OkStatus();
    std::string message;
    for (const std::string& line : lines_) {
      if (!message.empty()) message += '\n';
      message += line;
    }
    if (count_ > lines_.size()) {
      message += fmt::format("\n{}: ... and {} more errors", source_, count_ - lines_.size());
    }
    return absl::InvalidArgumentError(message);
  }

 private:
  static constexpr size_t kMaxLines = 50;

  // The position of `key`, or of its nearest enclosing table that has one (a missing key is
  // reported where its table starts).
  Position Find(std::string_view key) const {
    for (std::string_view k = key; !k.empty(); k = ParentKey(k)) {
      auto it = positions_->find(k);
      if (it != positions_->end() && it->second.line != 0) return it->second;
    }
    return {};
  }

  std::string source_;
  const Positions* positions_;
  std::vector<std::string> lines_;
  size_t count_ = 0;
};

size_t EditDistance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

std::string_view TypeName(const toml::node& node) {
  switch (node.type()) {
    case toml::node_type::string:
      return "a string";
    case toml::node_type::integer:
      return "an integer";
    case toml::node_type::floating_point:
      return "a floating-point number";
    case toml::node_type::boolean:
      return "a boolean";
    case toml::node_type::date:
      return "a date";
    case toml::node_type::time:
      return "a time";
    case toml::node_type::date_time:
      return "a date-time";
    case toml::node_type::table:
      return "a table";
    case toml::node_type::array:
      return "an array";
    default:
      return "nothing";
  }
}

Position ToPosition(const toml::source_region& region) {
  return {region.begin.line, region.begin.column};
}

using KnownKeys = std::initializer_list<std::string_view>;

// Walks the TOML tree into a Config. Checks shapes and types only; rules between values are
// Validate's.
class Reader {
 public:
  Reader(Errors* errors, Positions* positions) : errors_(*errors), positions_(*positions) {}

  void ReadRoot(const toml::table& root, Config* config) {
    CheckKeys(root, "",
              {"agent", "log", "nbd", "group", "tls", "replication", "acl", "control", "metrics",
               "coordinator"});
    if (const toml::table* t = SubTable(root, "", "agent")) ReadAgent(*t, &config->agent);
    if (const toml::table* t = SubTable(root, "", "log")) ReadLog(*t, &config->log);
    if (const toml::table* t = SubTable(root, "", "nbd")) ReadNbd(*t, &config->nbd);
    ReadGroups(root, &config->groups);
    if (const toml::table* t = SubTable(root, "", "tls")) ReadTls(*t, &config->tls);
    if (const toml::table* t = SubTable(root, "", "replication")) {
      ReadReplication(*t, &config->replication);
    }
    ForEachTable(root, "", "acl", [&](const std::string& path, const toml::table& t) {
      ReadAcl(t, path, &config->acl.emplace_back());
    });
    if (const toml::table* t = SubTable(root, "", "control")) ReadControl(*t, &config->control);
    if (const toml::table* t = SubTable(root, "", "metrics")) ReadMetrics(*t, &config->metrics);
    if (const toml::table* t = SubTable(root, "", "coordinator")) {
      ReadCoordinator(*t, &config->coordinator.emplace());
    }
  }

 private:
  void ReadAgent(const toml::table& t, AgentConfig* agent) {
    const std::string path = "agent";
    CheckKeys(t, path, {"site", "state_dir"});
    ReadString(t, path, "site", &agent->site);
    ReadPath(t, path, "state_dir", &agent->state_dir);
  }

  void ReadLog(const toml::table& t, LogConfig* log) {
    const std::string path = "log";
    CheckKeys(t, path,
              {"dir", "write_buffer", "max_batch_bytes", "max_batch_records",
               "external_payload_min", "retention_bytes", "retention_seconds", "hard_cap",
               "checkpoint_interval_ms", "checkpoint_bytes", "checkpoint_chunk", "writeback"});
    ReadPath(t, path, "dir", &log->dir);
    ReadSize(t, path, "write_buffer", &log->write_buffer_bytes);
    ReadSize(t, path, "max_batch_bytes", &log->max_batch_bytes);
    ReadUint(t, path, "max_batch_records", &log->max_batch_records);
    ReadSize(t, path, "external_payload_min", &log->external_payload_min_bytes);
    ReadSize(t, path, "retention_bytes", &log->retention_bytes);
    ReadUint(t, path, "retention_seconds", &log->retention_seconds);
    ReadSize(t, path, "hard_cap", &log->hard_cap_bytes);
    ReadUint(t, path, "checkpoint_interval_ms", &log->checkpoint_interval_ms);
    ReadSize(t, path, "checkpoint_bytes", &log->checkpoint_bytes);
    ReadSize(t, path, "checkpoint_chunk", &log->checkpoint_chunk_bytes);
    ReadSize(t, path, "writeback", &log->writeback_bytes);
  }

  void ReadNbd(const toml::table& t, NbdConfig* nbd) {
    const std::string path = "nbd";
    CheckKeys(t, path,
              {"listen", "unix_sockets", "threads", "max_inflight_requests", "max_inflight_bytes"});
    ForEachString(t, path, "listen", [&](const std::string& key, const std::string& value) {
      absl::StatusOr<ListenAddress> address = ParseListenAddress(value);
      if (address.ok()) {
        nbd->listen.push_back(*address);
      } else {
        errors_.Add(key, std::string(address.status().message()));
      }
    });
    ForEachString(t, path, "unix_sockets", [&](const std::string&, const std::string& value) {
      nbd->unix_sockets.emplace_back(value);
    });
    ReadUint(t, path, "threads", &nbd->threads);
    ReadUint(t, path, "max_inflight_requests", &nbd->max_inflight_requests);
    ReadSize(t, path, "max_inflight_bytes", &nbd->max_inflight_bytes);
  }

  void ReadGroups(const toml::table& root, std::vector<GroupConfig>* groups) {
    ForEachTable(root, "", "group", [&](const std::string& path, const toml::table& t) {
      GroupConfig& group = groups->emplace_back();
      CheckKeys(t, path, {"name", "volume", "primary", "peer", "on_divergence"});
      ReadString(t, path, "name", &group.name);
      ForEachTable(t, path, "volume", [&](const std::string& vpath, const toml::table& v) {
        ReadVolume(v, vpath, &group.volumes.emplace_back());
      });
      ReadString(t, path, "primary", &group.primary);
      std::string on_divergence;
      if (ReadString(t, path, "on_divergence", &on_divergence)) {
        if (on_divergence == "rejoin") {
          group.on_divergence = GroupConfig::OnDivergence::kRejoin;
        } else if (on_divergence == "refuse") {
          group.on_divergence = GroupConfig::OnDivergence::kRefuse;
        } else {
          errors_.Add(JoinKey(path, "on_divergence"),
                      fmt::format("\"{}\": expected \"rejoin\" or \"refuse\"", on_divergence));
        }
      }
      ForEachTable(t, path, "peer", [&](const std::string& ppath, const toml::table& p) {
        ReadPeer(p, ppath, &group.peers.emplace_back());
      });
    });
  }

  void ReadPeer(const toml::table& t, const std::string& path, PeerConfig* peer) {
    CheckKeys(t, path,
              {"site", "address", "tls_name", "mode", "rate_limit", "compression",
               "sync_degrade_after_ms"});
    ReadString(t, path, "site", &peer->site);
    std::string address;
    if (ReadString(t, path, "address", &address)) {
      absl::StatusOr<ListenAddress> parsed = ParseDialAddress(address);
      if (parsed.ok()) {
        peer->address = *parsed;
      } else {
        errors_.Add(JoinKey(path, "address"), std::string(parsed.status().message()));
      }
    }
    ReadString(t, path, "tls_name", &peer->tls_name);
    ReadChoice(t, path, "mode", {{"async", PeerMode::kAsync}, {"sync", PeerMode::kSync}},
               &peer->mode);
    ReadSize(t, path, "rate_limit", &peer->rate_limit_bytes_per_second);
    ReadChoice(
        t, path, "compression",
        {{"none", Compression::kNone}, {"lz4", Compression::kLz4}, {"zstd", Compression::kZstd}},
        &peer->compression);
    ReadUint(t, path, "sync_degrade_after_ms", &peer->sync_degrade_after_ms);
  }

  void ReadTls(const toml::table& t, TlsConfig* tls) {
    const std::string path = "tls";
    CheckKeys(t, path, {"ca", "cert", "key", "insecure"});
    ReadPath(t, path, "ca", &tls->ca);
    ReadPath(t, path, "cert", &tls->cert);
    ReadPath(t, path, "key", &tls->key);
    ReadBool(t, path, "insecure", &tls->insecure);
  }

  void ReadReplication(const toml::table& t, ReplicationConfig* replication) {
    const std::string path = "replication";
    CheckKeys(t, path,
              {"listen", "max_window", "min_window", "max_batch_bytes", "max_batch_delay_us",
               "keepalive_ms", "replica_sync_interval_ms"});
    std::string listen;
    if (ReadString(t, path, "listen", &listen)) {
      absl::StatusOr<ListenAddress> parsed = ParseListenAddress(listen);
      if (parsed.ok()) {
        replication->listen = *parsed;
      } else {
        errors_.Add("replication.listen", std::string(parsed.status().message()));
      }
    }
    ReadSize(t, path, "max_window", &replication->max_window_bytes);
    ReadSize(t, path, "min_window", &replication->min_window_bytes);
    ReadSize(t, path, "max_batch_bytes", &replication->max_batch_bytes);
    ReadUint(t, path, "max_batch_delay_us", &replication->max_batch_delay_us);
    ReadUint(t, path, "keepalive_ms", &replication->keepalive_ms);
    ReadUint(t, path, "replica_sync_interval_ms", &replication->replica_sync_interval_ms);
  }

  void ReadAcl(const toml::table& t, const std::string& path, AclConfig* acl) {
    CheckKeys(t, path, {"identity", "site", "groups"});
    ReadString(t, path, "identity", &acl->identity);
    ReadString(t, path, "site", &acl->site);
    ForEachString(t, path, "groups", [&](const std::string&, const std::string& value) {
      acl->groups.push_back(value);
    });
  }

  void ReadControl(const toml::table& t, ControlConfig* control) {
    const std::string path = "control";
    CheckKeys(t, path, {"unix_socket"});
    ReadPath(t, path, "unix_socket", &control->unix_socket);
  }

  void ReadMetrics(const toml::table& t, MetricsConfig* metrics) {
    const std::string path = "metrics";
    CheckKeys(t, path, {"listen"});
    std::string listen;
    if (ReadString(t, path, "listen", &listen)) {
      absl::StatusOr<ListenAddress> parsed = ParseListenAddress(listen);
      if (parsed.ok()) {
        metrics->listen = *parsed;
      } else {
        errors_.Add("metrics.listen", std::string(parsed.status().message()));
      }
    }
  }

  void ReadCoordinator(const toml::table& t, CoordinatorConfig* c) {
    const std::string path = "coordinator";
    CheckKeys(t, path,
              {"endpoints", "prefix", "ca", "cert", "key", "server_name", "lease_ttl_ms",
               "suspend_after_ms", "policy", "witness", "no_failover", "max_lag", "max_lag_ms",
               "anti_flap_ms", "timeout_ms"});
    ForEachString(t, path, "endpoints", [&](const std::string&, const std::string& value) {
      c->endpoints.push_back(value);
    });
    ReadString(t, path, "prefix", &c->prefix);
    ReadPath(t, path, "ca", &c->ca);
    ReadPath(t, path, "cert", &c->cert);
    ReadPath(t, path, "key", &c->key);
    ReadString(t, path, "server_name", &c->server_name);
    ReadUint(t, path, "lease_ttl_ms", &c->lease_ttl_ms);
    ReadUint(t, path, "suspend_after_ms", &c->suspend_after_ms);
    ReadChoice(t, path, "policy",
               {{"automatic", FailoverPolicy::kAutomatic},
                {"manual", FailoverPolicy::kManual},
                {"approve", FailoverPolicy::kApprove}},
               &c->policy);
    ReadString(t, path, "witness", &c->witness);
    ReadBool(t, path, "no_failover", &c->no_failover);
    ReadSize(t, path, "max_lag", &c->max_lag_bytes);
    ReadUint(t, path, "max_lag_ms", &c->max_lag_ms);
    ReadUint(t, path, "anti_flap_ms", &c->anti_flap_ms);
    ReadUint(t, path, "timeout_ms", &c->timeout_ms);
  }

  void ReadVolume(const toml::table& t, const std::string& path, VolumeConfig* volume) {
    CheckKeys(t, path, {"name", "export", "path", "size", "read_only", "direct_io"});
    ReadString(t, path, "name", &volume->name);
    ReadString(t, path, "export", &volume->export_name);
    ReadPath(t, path, "path", &volume->path);
    // An explicit 0 is a mistake; leaving `size` out means "the whole block device".
    if (ReadSize(t, path, "size", &volume->size_bytes) && volume->size_bytes == 0) {
      errors_.Add(JoinKey(path, "size"), "must be > 0 (leave it out to use a whole block device)");
    }
    ReadBool(t, path, "read_only", &volume->read_only);
    ReadBool(t, path, "direct_io", &volume->direct_io);
  }

  // Records where every key of `t` is and reports the ones not in `known`.
  void CheckKeys(const toml::table& t, const std::string& path, KnownKeys known) {
    for (const auto& [key, node] : t) {
      const std::string key_path = JoinKey(path, key.str());
      Position pos = ToPosition(key.source());
      if (pos.line == 0) pos = ToPosition(node.source());
      positions_[key_path] = pos;
      if (std::find(known.begin(), known.end(), key.str()) != known.end()) continue;
      errors_.Add(key_path, UnknownKeyMessage(key.str(), known));
    }
  }

  static std::string UnknownKeyMessage(std::string_view key, KnownKeys known) {
    std::string_view best;
    size_t best_distance = std::numeric_limits<size_t>::max();
    for (std::string_view candidate : known) {
      const size_t d = EditDistance(key, candidate);
      if (d < best_distance) best_distance = d, best = candidate;
    }
    if (best_distance <= 2 && best_distance < key.size()) {
      return fmt::format("unknown key \"{}\" (did you mean \"{}\"?)", key, best);
    }
    std::string list;
    for (std::string_view candidate : known) {
      list += list.empty() ? "" : ", ";
      list += candidate;
    }
    return fmt::format("unknown key \"{}\" (known keys here: {})", key, list);
  }

  const toml::table* SubTable(const toml::table& t, const std::string& path, std::string_view key) {
    const toml::node* node = t.get(key);
    if (node == nullptr) return nullptr;
    const std::string key_path = JoinKey(path, key);
    if (!node->is_table()) {
      errors_.Add(key_path,
                  fmt::format("expected a table ([{}]), got {}", key_path, TypeName(*node)));
      return nullptr;
    }
    positions_[key_path] = ToPosition(node->source());
    return node->as_table();
  }

  // Calls fn(key path, table) for each table of the array of tables `key` ([[key]]).
  template <typename Fn>
  void ForEachTable(const toml::table& t, const std::string& path, std::string_view key, Fn fn) {
    const toml::node* node = t.get(key);
    if (node == nullptr) return;
    const std::string key_path = JoinKey(path, key);
    const std::string expected = fmt::format("expected an array of tables ([[{}]])", key_path);
    const toml::array* array = node->as_array();
    if (array == nullptr) {
      errors_.Add(key_path, fmt::format("{}, got {}", expected, TypeName(*node)));
      return;
    }
    for (size_t i = 0; i < array->size(); ++i) {
      const toml::node& element = *array->get(i);
      const std::string element_path = fmt::format("{}[{}]", key_path, i);
      positions_[element_path] = ToPosition(element.source());
      if (!element.is_table()) {
        errors_.Add(element_path, fmt::format("{}, got {}", expected, TypeName(element)));
        continue;
      }
      fn(element_path, *element.as_table());
    }
  }

  // Calls fn(key path, value) for each element of the array of strings `key`.
  template <typename Fn>
  void ForEachString(const toml::table& t, const std::string& path, std::string_view key, Fn fn) {
    const toml::node* node = t.get(key);
    if (node == nullptr) return;
    const std::string key_path = JoinKey(path, key);
    const toml::array* array = node->as_array();
    if (array == nullptr) {
      errors_.Add(key_path, fmt::format("expected an array of strings, got {}", TypeName(*node)));
      return;
    }
    for (size_t i = 0; i < array->size(); ++i) {
      const toml::node& element = *array->get(i);
      const std::string element_path = fmt::format("{}[{}]", key_path, i);
      positions_[element_path] = ToPosition(element.source());
      const std::optional<std::string> value = element.value_exact<std::string>();
      if (!value) {
        errors_.Add(element_path, fmt::format("expected a string, got {}", TypeName(element)));
      } else if (value->empty()) {
        errors_.Add(element_path, "must not be empty");
      } else {
        fn(element_path, *value);
      }
    }
  }

  bool ReadString(const toml::table& t, const std::string& path, std::string_view key,
                  std::string* out) {
    const toml::node* node = t.get(key);
    if (node == nullptr) return false;
    const std::optional<std::string> value = node->value_exact<std::string>();
    if (!value) {
      errors_.Add(JoinKey(path, key), fmt::format("expected a string, got {}", TypeName(*node)));
      return false;
    }
    if (value->empty()) {
      errors_.Add(JoinKey(path, key), "must not be empty");
      return false;
    }
    *out = *value;
    return true;
  }

  // A string that must be one of `choices`; the message lists them.
  template <typename T>
  void ReadChoice(const toml::table& t, const std::string& path, std::string_view key,
                  std::initializer_list<std::pair<std::string_view, T>> choices, T* out) {
    std::string value;
    if (!ReadString(t, path, key, &value)) return;
    std::string list;
    for (const auto& [name, choice] : choices) {
      if (name == value) {
        *out = choice;
        return;
      }
      list += fmt::format("{}\"{}\"", list.empty() ? "" : " or ", name);
    }
    errors_.Add(JoinKey(path, key), fmt::format("must be {}, got \"{}\"", list, value));
  }

  void ReadPath(const toml::table& t, const std::string& path, std::string_view key,
                fs::path* out) {
    std::string value;
    if (ReadString(t, path, key, &value)) *out = value;
  }

  void ReadBool(const toml::table& t, const std::string& path, std::string_view key, bool* out) {
    const toml::node* node = t.get(key);
    if (node == nullptr) return;
    const std::optional<bool> value = node->value_exact<bool>();
    if (!value) {
      errors_.Add(JoinKey(path, key),
                  fmt::format("expected a boolean (true or false), got {}", TypeName(*node)));
      return;
    }
    *out = *value;
  }

  template <typename T>
  void ReadUint(const toml::table& t, const std::string& path, std::string_view key, T* out) {
    const toml::node* node = t.get(key);
    if (node == nullptr) return;
    const std::optional<int64_t> value = node->value_exact<int64_t>();
    if (!value) {
      errors_.Add(JoinKey(path, key), fmt::format("expected an integer, got {}", TypeName(*node)));
    } else if (*value < 0) {
      errors_.Add(JoinKey(path, key), fmt::format("must not be negative, got {}", *value));
    } else if (static_cast<uint64_t>(*value) > std::numeric_limits<T>::max()) {
      errors_.Add(JoinKey(path, key),
                  fmt::format("must be at most {}, got {}", std::numeric_limits<T>::max(), *value));
    } else {
      *out = static_cast<T>(*value);
    }
  }

  // A size is an integer (bytes) or a string with a binary unit. Returns whether `key` was set.
  bool ReadSize(const toml::table& t, const std::string& path, std::string_view key,
                uint64_t* out) {
    const toml::node* node = t.get(key);
    if (node == nullptr) return false;
    const std::string key_path = JoinKey(path, key);
    if (const std::optional<int64_t> n = node->value_exact<int64_t>()) {
      if (*n < 0) {
        errors_.Add(key_path, fmt::format("must not be negative, got {}", *n));
        return false;
      }
      *out = static_cast<uint64_t>(*n);
      return true;
    }
    if (const std::optional<std::string> s = node->value_exact<std::string>()) {
      absl::StatusOr<uint64_t> size = ParseSize(*s);
      if (!size.ok()) {
        errors_.Add(key_path, std::string(size.status().message()));
        return false;
      }
      *out = *size;
      return true;
    }
    errors_.Add(key_path, fmt::format("expected a size (an integer number of bytes or a string "
                                      "like \"1GiB\"), got {}",
                                      TypeName(*node)));
    return false;
  }

  Errors& errors_;
  Positions& positions_;
};

// ---- Validate ----

bool IsSiteName(std::string_view name) {
  if (name.empty() || name.size() > kMaxNameLength) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-';
  });
}

bool IsObjectName(std::string_view name) {
  if (name.empty() || name.size() > kMaxNameLength) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_';
  });
}

bool IsExportName(std::string_view name) {
  if (name.empty() || name.size() > kMaxExportNameLength) return false;
  return std::all_of(name.begin(), name.end(), [](char c) { return c > ' ' && c < 0x7f; });
}

// Lexically normal, without a trailing separator ("/a/b/" -> "/a/b").
fs::path Normalize(const fs::path& path) {
  fs::path normal = path.lexically_normal();
  if (!normal.has_filename() && normal.has_relative_path()) normal = normal.parent_path();
  return normal;
}

fs::path Resolve(const fs::path& state_dir, const fs::path& path) {
  return Normalize(path.is_absolute() ? path : state_dir / path);
}

// Whether `path` is `dir` or lies under it (both normalized and absolute).
bool IsWithin(const fs::path& path, const fs::path& dir) {
  auto [dir_end, path_it] = std::mismatch(dir.begin(), dir.end(), path.begin(), path.end());
  return dir_end == dir.end();
}

bool IsBlockDevice(const fs::path& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISBLK(st.st_mode);
}

enum class PemKind { kCertificate, kPrivateKey };

// Checks that `path` is a readable regular file holding the PEM block `kind`. Returns what is
// wrong, or "" if nothing. A light check (the transport parses the files): it catches a missing
// file, a swapped cert and key, and an encrypted key, which tvillingd cannot use.
std::string CheckPemFile(const fs::path& path, PemKind kind) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return fmt::format("cannot read \"{}\": {}", path.string(), std::strerror(errno));
  }
  std::string problem;
  std::string text;
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    problem = fmt::format("cannot stat \"{}\": {}", path.string(), std::strerror(errno));
  } else if (!S_ISREG(st.st_mode)) {
    problem = fmt::format("\"{}\" is not a regular file", path.string());
  } else {
    constexpr size_t kMaxPemBytes = 1u << 20;
    text.resize(kMaxPemBytes);
    size_t got = 0;
    while (got < text.size()) {
      const ssize_t n = ::read(fd, text.data() + got, text.size() - got);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        problem = fmt::format("cannot read \"{}\": {}", path.string(), std::strerror(errno));
        break;
      }
      if (n == 0) break;
      got += static_cast<size_t>(n);
    }
    text.resize(got);
  }
  ::close(fd);
  if (!problem.empty()) return problem;
  if (kind == PemKind::kCertificate) {
    if (text.find("-----BEGIN CERTIFICATE-----") == std::string::npos) {
      return fmt::format("\"{}\" holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                         path.string());
    }
    return "";
  }
  if (text.find("-----BEGIN ENCRYPTED PRIVATE KEY-----") != std::string::npos) {
    return fmt::format(
        "\"{}\" is an encrypted private key; tvillingd needs it unencrypted "
        "(readable by tvillingd only)",
        path.string());
  }
  if (text.find("PRIVATE KEY-----") == std::string::npos) {
    return fmt::format("\"{}\" holds no PEM private key (-----BEGIN PRIVATE KEY-----)",
                       path.string());
  }
  return "";
}

// Remembers the first key that used each value and reports a repeat.
class UniqueCheck {
 public:
  explicit UniqueCheck(std::string_view what) : what_(what) {}
  // Returns whether `value` is new.
  bool Check(Errors& errors, const std::string& key, const std::string& value) {
    auto [it, inserted] = first_key_.emplace(value, key);
    if (!inserted) {
      errors.Add(key, fmt::format("duplicate {} \"{}\" (also at {})", what_, value, it->second));
    }
    return inserted;
  }

 private:
  std::string_view what_;
  std::map<std::string, std::string> first_key_;
};

template <typename T>
void CheckRange(Errors& errors, std::string_view key, T value, T min, T max,
                std::string_view unit = "") {
  if (value >= min && value <= max) return;
  errors.Add(key, fmt::format("must be {}..{}{}, got {}", min, max, unit, value));
}

void CheckSizeRange(Errors& errors, std::string_view key, uint64_t value, uint64_t min,
                    uint64_t max) {
  if (value >= min && value <= max) return;
  errors.Add(key, fmt::format("must be between {} and {}, got {}", FormatSize(min), FormatSize(max),
                              FormatSize(value)));
}

void ValidateAgent(AgentConfig& agent, Errors& errors) {
  if (agent.site.empty()) {
    errors.Add("agent.site", "required (the name of this agent's site, e.g. \"sto-1\")");
  } else if (!IsSiteName(agent.site)) {
    errors.Add("agent.site", fmt::format("must be 1..{} characters of a-z, 0-9 and '-', got \"{}\"",
                                         kMaxNameLength, agent.site));
  }
  if (agent.state_dir.empty()) agent.state_dir = fs::path(kDefaultStateDir);
  if (!agent.state_dir.is_absolute()) {
    errors.Add("agent.state_dir",
               fmt::format("must be an absolute path, got \"{}\"", agent.state_dir.string()));
  }
  agent.state_dir = Normalize(agent.state_dir);
}

void ValidateLog(LogConfig& log, const fs::path& state_dir, Errors& errors) {
  if (log.dir.empty()) {
    errors.Add("log.dir", "must not be empty");
  } else {
    log.dir = Resolve(state_dir, log.dir);
  }
  CheckSizeRange(errors, "log.write_buffer", log.write_buffer_bytes, kMinWriteBufferBytes,
                 kMaxWriteBufferBytes);
  CheckSizeRange(errors, "log.max_batch_bytes", log.max_batch_bytes, kMinBatchBytes,
                 kMaxBatchBytes);
  if (log.max_batch_bytes > log.write_buffer_bytes) {
    errors.Add("log.max_batch_bytes",
               fmt::format("must not exceed log.write_buffer ({}), got {}",
                           FormatSize(log.write_buffer_bytes), FormatSize(log.max_batch_bytes)));
  }
  CheckRange<uint32_t>(errors, "log.max_batch_records", log.max_batch_records, 1, kMaxBatchRecords);
  if (log.external_payload_min_bytes != 0 &&
      (log.external_payload_min_bytes <= 16 || log.external_payload_min_bytes > (32ull << 20))) {
    errors.Add("log.external_payload_min",
               fmt::format("must be 0 (off) or from 17 bytes to 32 MiB, got {}",
                           FormatSize(log.external_payload_min_bytes)));
  }
  if (log.hard_cap_bytes != 0 && log.hard_cap_bytes < log.retention_bytes) {
    errors.Add("log.hard_cap",
               fmt::format("must be >= log.retention_bytes ({}) or 0 (no cap), got {}",
                           FormatSize(log.retention_bytes), FormatSize(log.hard_cap_bytes)));
  }
  CheckRange<uint32_t>(errors, "log.checkpoint_interval_ms", log.checkpoint_interval_ms, 1,
                       kMaxCheckpointIntervalMs, " ms");
  if (log.checkpoint_bytes < kMinCheckpointBytes || log.checkpoint_bytes > kMaxCheckpointBytes) {
    errors.Add("log.checkpoint_bytes",
               fmt::format("must be between {} and {}, got {}", FormatSize(kMinCheckpointBytes),
                           FormatSize(kMaxCheckpointBytes), FormatSize(log.checkpoint_bytes)));
  }
  if (log.checkpoint_chunk_bytes != 0 && (log.checkpoint_chunk_bytes < kMinCheckpointChunkBytes ||
                                          log.checkpoint_chunk_bytes > kMaxCheckpointChunkBytes)) {
    errors.Add(
        "log.checkpoint_chunk",
        fmt::format("must be 0 (unpaced) or between {} and {}, got {}",
                    FormatSize(kMinCheckpointChunkBytes), FormatSize(kMaxCheckpointChunkBytes),
                    FormatSize(log.checkpoint_chunk_bytes)));
  }
  if (log.writeback_bytes != 0 && (log.writeback_bytes < kMinCheckpointChunkBytes ||
                                   log.writeback_bytes > kMaxCheckpointChunkBytes)) {
    errors.Add("log.writeback",
               fmt::format("must be 0 (only at checkpoints) or between {} and {}, got {}",
                           FormatSize(kMinCheckpointChunkBytes),
                           FormatSize(kMaxCheckpointChunkBytes), FormatSize(log.writeback_bytes)));
  }
}

void ValidateNbd(NbdConfig& nbd, const fs::path& state_dir, Errors& errors) {
  if (nbd.listen.empty() && nbd.unix_sockets.empty()) {
    errors.Add("nbd",
               "no listener: set nbd.listen (e.g. [\"127.0.0.1:10809\"]) or nbd.unix_sockets");
  }
  if (nbd.listen.size() + nbd.unix_sockets.size() > kMaxListeners) {
    errors.Add("nbd", fmt::format("at most {} listeners, got {}", kMaxListeners,
                                  nbd.listen.size() + nbd.unix_sockets.size()));
  }
  UniqueCheck unique_listen("listen address");
  for (size_t i = 0; i < nbd.listen.size(); ++i) {
    const std::string key = fmt::format("nbd.listen[{}]", i);
    // Re-parse so that a ListenAddress built in code gets the same checks as one read from a file.
    absl::StatusOr<ListenAddress> parsed = ParseListenAddress(nbd.listen[i].ToString());
    if (!parsed.ok()) errors.Add(key, std::string(parsed.status().message()));
    unique_listen.Check(errors, key, nbd.listen[i].ToString());
  }
  UniqueCheck unique_socket("unix socket");
  for (size_t i = 0; i < nbd.unix_sockets.size(); ++i) {
    const std::string key = fmt::format("nbd.unix_sockets[{}]", i);
    if (nbd.unix_sockets[i].empty()) {
      errors.Add(key, "must not be empty");
      continue;
    }
    nbd.unix_sockets[i] = Resolve(state_dir, nbd.unix_sockets[i]);
    const std::string& resolved = nbd.unix_sockets[i].native();
    if (resolved.size() > kMaxUnixSocketPathBytes) {
      errors.Add(key, fmt::format("\"{}\" is {} bytes; a unix socket path must be at most {} bytes",
                                  resolved, resolved.size(), kMaxUnixSocketPathBytes));
    }
    unique_socket.Check(errors, key, resolved);
  }
  CheckRange<uint32_t>(errors, "nbd.threads", nbd.threads, 1, kMaxNbdThreads);
  CheckRange<uint32_t>(errors, "nbd.max_inflight_requests", nbd.max_inflight_requests, 1,
                       kMaxInflightRequests);
  CheckSizeRange(errors, "nbd.max_inflight_bytes", nbd.max_inflight_bytes, kMinInflightBytes,
                 kMaxInflightBytes);
}

// Uniqueness across the whole agent: one NBD server serves every export, one state dir holds every
// volume.
struct AgentWideNames {
  UniqueCheck volume_names{"volume name"};
  UniqueCheck export_names{"export name"};
  UniqueCheck volume_paths{"volume path"};
};

void ValidateVolume(VolumeConfig& volume, const std::string& key, const Config& config,
                    AgentWideNames& names, Errors& errors) {
  const std::string name_key = key + ".name";
  bool name_unique = true;
  if (volume.name.empty()) {
    errors.Add(name_key, "required");
  } else if (!IsObjectName(volume.name)) {
    errors.Add(name_key, fmt::format("must be 1..{} characters of A-Z, a-z, 0-9, '-' and '_', got "
                                     "\"{}\"",
                                     kMaxNameLength, volume.name));
  } else {
    name_unique = names.volume_names.Check(errors, name_key, volume.name);
  }
  const bool export_defaulted = volume.export_name.empty() || volume.export_name == volume.name;
  if (volume.export_name.empty()) volume.export_name = volume.name;
  const std::string export_key = key + ".export";
  if (!export_defaulted && !IsExportName(volume.export_name)) {
    errors.Add(export_key,
               fmt::format("must be 1..{} printable ASCII characters without spaces, got \"{}\"",
                           kMaxExportNameLength, volume.export_name));
  }
  // A clash of a defaulted export is reported at `name`, unless that name was already reported.
  if (!volume.export_name.empty() && (!export_defaulted || name_unique)) {
    names.export_names.Check(errors, export_defaulted ? name_key : export_key, volume.export_name);
  }
  const std::string path_key = key + ".path";
  if (volume.path.empty()) {
    errors.Add(path_key, "required (a file or a block device)");
    return;
  }
  volume.path = Resolve(config.agent.state_dir, volume.path);
  names.volume_paths.Check(errors, path_key, volume.path.string());
  if (!config.log.dir.empty() && IsWithin(volume.path, config.log.dir)) {
    errors.Add(path_key, fmt::format("\"{}\" is inside the log directory \"{}\"",
                                     volume.path.string(), config.log.dir.string()));
  }
  const std::string size_key = key + ".size";
  if (volume.size_bytes == 0) {
    if (!IsBlockDevice(volume.path)) {
      errors.Add(size_key, fmt::format("required for a file volume (\"{}\" is not a block device): "
                                       "e.g. size = \"1GiB\"",
                                       volume.path.string()));
    }
  } else if (volume.size_bytes % kVolumeSizeAlignmentBytes != 0) {
    errors.Add(size_key, fmt::format("must be a multiple of {} bytes, got {}",
                                     kVolumeSizeAlignmentBytes, volume.size_bytes));
  }
}

bool HasPeer(const GroupConfig& group, std::string_view site) {
  return std::any_of(group.peers.begin(), group.peers.end(),
                     [&](const PeerConfig& peer) { return peer.site == site; });
}

// A DNS name as a certificate may carry it: letters, digits, '-', '.', and a leading "*." label.
bool IsTlsName(std::string_view name) {
  if (name.empty() || name.size() > kMaxTlsNameLength) return false;
  if (name.substr(0, 2) == "*.") name.remove_prefix(2);
  if (name.empty() || name.front() == '.' || name.back() == '.') return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '.';
  });
}

void ValidatePeers(GroupConfig& group, const std::string& key, const std::string& own_site,
                   Errors& errors) {
  if (group.peers.size() > kMaxPeersPerGroup) {
    errors.Add(key + ".peer", fmt::format("at most {} peers per group, got {}", kMaxPeersPerGroup,
                                          group.peers.size()));
  }
  UniqueCheck sites("peer site");
  std::string peer_list;
  for (size_t p = 0; p < group.peers.size(); ++p) {
    PeerConfig& peer = group.peers[p];
    const std::string peer_key = fmt::format("{}.peer[{}]", key, p);
    if (peer.site.empty()) {
      errors.Add(peer_key + ".site", "required (the peer's site, as in its agent.site)");
    } else if (!IsSiteName(peer.site)) {
      errors.Add(peer_key + ".site",
                 fmt::format("must be 1..{} characters of a-z, 0-9 and '-', got \"{}\"",
                             kMaxNameLength, peer.site));
    } else if (peer.site == own_site) {
      errors.Add(peer_key + ".site",
                 fmt::format("\"{}\" is this agent's own site (agent.site); list only the other "
                             "sites",
                             peer.site));
    } else if (sites.Check(errors, peer_key + ".site", peer.site)) {
      peer_list += fmt::format("{}\"{}\"", peer_list.empty() ? "" : ", ", peer.site);
    }
    if (peer.address.host.empty()) {
      errors.Add(peer_key + ".address",
                 "required: \"host:port\" of the peer's replication.listen, e.g. "
                 "\"192.0.2.10:7301\"");
    } else {
      absl::StatusOr<ListenAddress> parsed = ParseDialAddress(peer.address.ToString());
      if (!parsed.ok()) errors.Add(peer_key + ".address", std::string(parsed.status().message()));
    }
    if (peer.tls_name.empty()) peer.tls_name = peer.site;
    if (!peer.tls_name.empty() && !IsTlsName(peer.tls_name)) {
      errors.Add(peer_key + ".tls_name",
                 fmt::format("must be a DNS name (letters, digits, '-', '.'), 1..{} characters, "
                             "got \"{}\"",
                             kMaxTlsNameLength, peer.tls_name));
    }
    if (peer.sync_degrade_after_ms != 0 && peer.mode != PeerMode::kSync) {
      errors.Add(peer_key + ".sync_degrade_after_ms",
                 "applies only to mode = \"sync\" (an async peer never holds a write)");
    }
    CheckRange<uint32_t>(errors, peer_key + ".sync_degrade_after_ms", peer.sync_degrade_after_ms, 0,
                         kMaxSyncDegradeAfterMs, " ms");
  }

  const std::string primary_key = key + ".primary";
  if (group.peers.empty()) {
    if (group.primary.empty()) {
      group.primary = own_site;
    } else if (group.primary != own_site) {
      errors.Add(primary_key,
                 fmt::format("\"{}\" is not this agent's site (\"{}\") and the group has no "
                             "[[group.peer]]",
                             group.primary, own_site));
    }
    return;
  }
  if (group.primary.empty()) {
    errors.Add(primary_key,
               fmt::format("required when the group has peers: \"{}\" (this agent) or one of {}",
                           own_site, peer_list));
  } else if (group.primary != own_site && !HasPeer(group, group.primary)) {
    errors.Add(primary_key,
               fmt::format("\"{}\" is neither this agent's site (\"{}\") nor a peer of the group "
                           "({})",
                           group.primary, own_site, peer_list));
  }
}

void ValidateGroups(Config& config, Errors& errors) {
  if (config.groups.empty()) {
    errors.Add("group", "no [[group]]: the agent needs at least one group with one volume");
  } else if (config.groups.size() > kMaxGroups) {
    errors.Add("group", fmt::format("at most {} groups, got {}", kMaxGroups, config.groups.size()));
  }
  UniqueCheck group_names("group name");
  AgentWideNames names;
  for (size_t g = 0; g < config.groups.size(); ++g) {
    GroupConfig& group = config.groups[g];
    const std::string key = fmt::format("group[{}]", g);
    if (group.name.empty()) {
      errors.Add(key + ".name", "required");
    } else if (!IsObjectName(group.name)) {
      errors.Add(key + ".name",
                 fmt::format("must be 1..{} characters of A-Z, a-z, 0-9, '-' and '_', got \"{}\"",
                             kMaxNameLength, group.name));
    } else {
      group_names.Check(errors, key + ".name", group.name);
    }
    if (group.volumes.empty()) {
      errors.Add(key + ".volume", "no [[group.volume]]: a group needs at least one volume");
    } else if (group.volumes.size() > kMaxVolumesPerGroup) {
      errors.Add(key + ".volume", fmt::format("at most {} volumes per group, got {}",
                                              kMaxVolumesPerGroup, group.volumes.size()));
    }
    for (size_t v = 0; v < group.volumes.size(); ++v) {
      ValidateVolume(group.volumes[v], fmt::format("{}.volume[{}]", key, v), config, names, errors);
    }
    ValidatePeers(group, key, config.agent.site, errors);
  }
}

// TLS: mutual TLS unless the operator explicitly turned it off. Files are checked here so that a
// typo shows at startup with the key that holds it, not as a handshake failure later.
void ValidateTls(Config& config, Errors& errors) {
  TlsConfig& tls = config.tls;
  const bool any_file = !tls.ca.empty() || !tls.cert.empty() || !tls.key.empty();
  if (tls.insecure) {
    if (any_file) {
      errors.Add("tls.insecure",
                 "true turns TLS off, but tls.ca, tls.cert or tls.key is set: remove them, or set "
                 "insecure = false");
    }
    return;
  }
  if (!any_file) {
    if (config.HasPeers()) {
      errors.Add("tls",
                 "groups have peers but neither TLS nor insecure mode is configured: set tls.ca, "
                 "tls.cert and tls.key (mutual TLS between agents), or tls.insecure = true (no "
                 "authentication; tests only)");
    }
    return;
  }
  const struct {
    const char* key;
    fs::path* path;
    PemKind kind;
    const char* what;
  } files[] = {
      {"tls.ca", &tls.ca, PemKind::kCertificate,
       "PEM file of the CA that signs the agents' "
       "certificates"},
      {"tls.cert", &tls.cert, PemKind::kCertificate, "PEM file of this agent's certificate"},
      {"tls.key", &tls.key, PemKind::kPrivateKey, "PEM file of this agent's private key"},
  };
  for (const auto& file : files) {
    if (file.path->empty()) {
      errors.Add(file.key, fmt::format("required with TLS ({})", file.what));
      continue;
    }
    *file.path = Resolve(config.agent.state_dir, *file.path);
    if (std::string problem = CheckPemFile(*file.path, file.kind); !problem.empty()) {
      errors.Add(file.key, problem);
    }
  }
}

void ValidateReplication(Config& config, Errors& errors) {
  ReplicationConfig& r = config.replication;
  if (!r.listen.has_value()) {
    if (config.HasPeers()) {
      errors.Add("replication.listen",
                 "required when a group has peers: the \"host:port\" where peers connect, e.g. "
                 "\"0.0.0.0:7301\"");
    }
  } else {
    absl::StatusOr<ListenAddress> parsed = ParseListenAddress(r.listen->ToString());
    if (!parsed.ok()) errors.Add("replication.listen", std::string(parsed.status().message()));
    for (size_t i = 0; i < config.nbd.listen.size(); ++i) {
      if (config.nbd.listen[i] == *r.listen) {
        errors.Add("replication.listen",
                   fmt::format("\"{}\" is also nbd.listen[{}]", r.listen->ToString(), i));
      }
    }
  }
  CheckSizeRange(errors, "replication.max_window", r.max_window_bytes, kMinReplicationWindowBytes,
                 kMaxReplicationWindowBytes);
  CheckSizeRange(errors, "replication.min_window", r.min_window_bytes, kMinReplicationWindowBytes,
                 kMaxReplicationWindowBytes);
  if (r.min_window_bytes > r.max_window_bytes) {
    errors.Add("replication.min_window",
               fmt::format("must not exceed replication.max_window ({}), got {}",
                           FormatSize(r.max_window_bytes), FormatSize(r.min_window_bytes)));
  }
  CheckSizeRange(errors, "replication.max_batch_bytes", r.max_batch_bytes,
                 kMinReplicationBatchBytes, kMaxReplicationBatchBytes);
  // A batch larger than the smallest window could find no room when the window shrinks.
  if (r.max_batch_bytes > r.min_window_bytes) {
    errors.Add("replication.max_batch_bytes",
               fmt::format("must not exceed replication.min_window ({}), got {}",
                           FormatSize(r.min_window_bytes), FormatSize(r.max_batch_bytes)));
  }
  CheckRange<uint32_t>(errors, "replication.max_batch_delay_us", r.max_batch_delay_us, 0,
                       kMaxBatchDelayUs, " us");
  CheckRange<uint32_t>(errors, "replication.keepalive_ms", r.keepalive_ms, kMinKeepaliveMs,
                       kMaxKeepaliveMs, " ms");
  CheckRange<uint32_t>(errors, "replication.replica_sync_interval_ms", r.replica_sync_interval_ms,
                       1, kMaxReplicaSyncIntervalMs, " ms");
}

const GroupConfig* FindGroup(const Config& config, std::string_view name) {
  for (const GroupConfig& group : config.groups) {
    if (group.name == name) return &group;
  }
  return nullptr;
}

bool AclAllowsGroup(const AclConfig& entry, std::string_view group) {
  return std::any_of(entry.groups.begin(), entry.groups.end(),
                     [&](const std::string& g) { return g == kAnyGroup || g == group; });
}

std::string GroupNames(const Config& config) {
  std::string names;
  for (const GroupConfig& group : config.groups) {
    names += fmt::format("{}{}", names.empty() ? "" : ", ", group.name);
  }
  return names;
}

void ValidateAcl(Config& config, Errors& errors) {
  if (config.acl.size() > kMaxAclEntries) {
    errors.Add("acl", fmt::format("at most {} entries, got {}", kMaxAclEntries, config.acl.size()));
  }
  std::map<std::string, std::string> named_identities;  // identity -> first key
  UniqueCheck any_identity_sites("site for identity \"*\"");
  for (size_t i = 0; i < config.acl.size(); ++i) {
    const AclConfig& entry = config.acl[i];
    const std::string key = fmt::format("acl[{}]", i);
    const std::string identity_key = key + ".identity";
    if (entry.identity.empty()) {
      errors.Add(identity_key,
                 "required (the CN or a DNS SAN of the peer's certificate, or \"*\" with "
                 "tls.insecure)");
    } else if (entry.identity == kAnyIdentity) {
      if (!config.tls.insecure) {
        errors.Add(identity_key,
                   "\"*\" (any peer) is accepted only with tls.insecure = true; name the CN or a "
                   "DNS SAN of the peer's certificate");
      } else if (!entry.site.empty()) {
        any_identity_sites.Check(errors, key + ".site", entry.site);
      }
    } else if (config.tls.insecure) {
      errors.Add(identity_key,
                 fmt::format("\"{}\" can never match: with tls.insecure = true peers have no "
                             "certificate; use identity = \"*\"",
                             entry.identity));
    } else if (!IsExportName(entry.identity)) {
      errors.Add(identity_key,
                 fmt::format("must be printable ASCII without spaces, got \"{}\"", entry.identity));
    } else if (auto [it, inserted] = named_identities.emplace(entry.identity, identity_key);
               !inserted) {
      errors.Add(identity_key,
                 fmt::format("duplicate acl identity \"{}\" (also at {}): an identity acts as "
                             "exactly one site; list all its groups in one [[acl]] entry",
                             entry.identity, it->second));
    }

    const std::string site_key = key + ".site";
    bool site_ok = false;
    if (entry.site.empty()) {
      errors.Add(site_key, "required (the site this identity may act as)");
    } else if (!IsSiteName(entry.site)) {
      errors.Add(site_key, fmt::format("must be 1..{} characters of a-z, 0-9 and '-', got \"{}\"",
                                       kMaxNameLength, entry.site));
    } else if (entry.site == config.agent.site) {
      errors.Add(site_key, fmt::format("\"{}\" is this agent's own site", entry.site));
    } else {
      site_ok = true;
    }

    const std::string groups_key = key + ".groups";
    if (entry.groups.empty()) {
      errors.Add(groups_key,
                 "required: the groups this identity may replicate, e.g. [\"g0\"], or [\"*\"]");
      continue;
    }
    for (size_t g = 0; g < entry.groups.size(); ++g) {
      const std::string& name = entry.groups[g];
      const std::string element_key = fmt::format("{}[{}]", groups_key, g);
      if (name == kAnyGroup) {
        if (entry.groups.size() != 1) {
          errors.Add(element_key, "\"*\" means every group and must be the only element");
        } else if (site_ok && !std::any_of(config.groups.begin(), config.groups.end(),
                                           [&](const GroupConfig& group) {
                                             return HasPeer(group, entry.site);
                                           })) {
          errors.Add(site_key, fmt::format("\"{}\" is not a peer of any group", entry.site));
        }
        continue;
      }
      const GroupConfig* group = FindGroup(config, name);
      if (group == nullptr) {
        errors.Add(element_key, fmt::format("unknown group \"{}\" (groups of this agent: {})", name,
                                            GroupNames(config)));
      } else if (site_ok && !HasPeer(*group, entry.site)) {
        errors.Add(element_key,
                   fmt::format("site \"{}\" is not a peer of group \"{}\" (add a [[group.peer]] "
                               "with site = \"{}\" or remove the group here)",
                               entry.site, name, entry.site));
      }
    }
  }

  // A replica must let its primary in; without an entry every stream would be refused.
  for (size_t g = 0; g < config.groups.size(); ++g) {
    const GroupConfig& group = config.groups[g];
    if (group.peers.empty() || group.primary.empty() || group.primary == config.agent.site ||
        !HasPeer(group, group.primary)) {
      continue;
    }
    const bool allowed = std::any_of(config.acl.begin(), config.acl.end(), [&](const AclConfig& e) {
      return e.site == group.primary && AclAllowsGroup(e, group.name);
    });
    if (!allowed) {
      errors.Add(fmt::format("group[{}].primary", g),
                 fmt::format("this agent is a replica of group \"{}\" but no [[acl]] entry lets "
                             "site \"{}\" replicate it: add one with identity = <CN of {}'s "
                             "certificate>, site = \"{}\", groups = [\"{}\"]",
                             group.name, group.primary, group.primary, group.primary, group.name));
    }
  }
}

void ValidateControl(Config& config, Errors& errors) {
  ControlConfig& control = config.control;
  if (control.unix_socket.empty()) {
    errors.Add("control.unix_socket", "must not be empty");
    return;
  }
  control.unix_socket = Resolve(config.agent.state_dir, control.unix_socket);
  const std::string& resolved = control.unix_socket.native();
  if (resolved.size() > kMaxUnixSocketPathBytes) {
    errors.Add("control.unix_socket",
               fmt::format("\"{}\" is {} bytes; a unix socket path must be at most {} bytes",
                           resolved, resolved.size(), kMaxUnixSocketPathBytes));
  }
  for (size_t i = 0; i < config.nbd.unix_sockets.size(); ++i) {
    if (config.nbd.unix_sockets[i] == control.unix_socket) {
      errors.Add("control.unix_socket",
                 fmt::format("\"{}\" is also nbd.unix_sockets[{}]", resolved, i));
    }
  }
}

void ValidateMetrics(const Config& config, Errors& errors) {
  if (!config.metrics.listen.has_value()) return;
  const ListenAddress& m = *config.metrics.listen;
  absl::StatusOr<ListenAddress> parsed = ParseListenAddress(m.ToString());
  if (!parsed.ok()) errors.Add("metrics.listen", std::string(parsed.status().message()));
  for (size_t i = 0; i < config.nbd.listen.size(); ++i) {
    if (config.nbd.listen[i] == m) {
      errors.Add("metrics.listen", fmt::format("\"{}\" is also nbd.listen[{}]", m.ToString(), i));
    }
  }
  if (config.replication.listen.has_value() && *config.replication.listen == m) {
    errors.Add("metrics.listen", fmt::format("\"{}\" is also replication.listen", m.ToString()));
  }
}

bool IsEtcdEndpoint(std::string_view e) {
  if (e.find("://") != std::string_view::npos) return false;
  const size_t colon = e.rfind(':');
  if (colon == std::string_view::npos || colon == 0 || colon + 1 >= e.size()) return false;
  const std::string_view port = e.substr(colon + 1);
  if (port.size() > 5) return false;
  uint32_t p = 0;
  for (char ch : port) {
    if (ch < '0' || ch > '9') return false;
    p = p * 10 + static_cast<uint32_t>(ch - '0');
  }
  return p > 0 && p < 65536;
}

void ValidateCoordinator(Config& config, Errors& errors) {
  if (!config.coordinator) return;
  CoordinatorConfig& c = *config.coordinator;
  if (c.endpoints.empty()) {
    errors.Add("coordinator.endpoints",
               "required: the etcd members' client addresses, e.g. [\"10.0.0.1:2379\", "
               "\"10.0.1.1:2379\", \"10.0.2.1:2379\"]");
  } else if (c.endpoints.size() > 16) {
    errors.Add("coordinator.endpoints", fmt::format("at most 16, got {}", c.endpoints.size()));
  }
  for (size_t i = 0; i < c.endpoints.size(); ++i) {
    if (!IsEtcdEndpoint(c.endpoints[i])) {
      errors.Add(fmt::format("coordinator.endpoints[{}]", i),
                 fmt::format("\"{}\" is not \"host:port\" (without a scheme such as http://), "
                             "e.g. \"10.0.0.1:2379\"",
                             c.endpoints[i]));
    }
  }
  if (c.prefix.empty() || c.prefix.front() != '/' || c.prefix.back() == '/') {
    errors.Add("coordinator.prefix",
               fmt::format("must start with '/' and not end with one, got \"{}\"", c.prefix));
  }
  if (c.cert.empty() != c.key.empty()) {
    errors.Add(c.cert.empty() ? "coordinator.cert" : "coordinator.key",
               "coordinator.cert and coordinator.key go together (a client certificate for "
               "etcd's --client-cert-auth)");
  }
  if ((!c.cert.empty() || !c.server_name.empty()) && c.ca.empty()) {
    errors.Add("coordinator.ca",
               "required with coordinator.cert or coordinator.server_name: the PEM file of the CA "
               "that signs the etcd members' certificates");
  }
  const struct {
    const char* key;
    fs::path* path;
    PemKind kind;
  } files[] = {{"coordinator.ca", &c.ca, PemKind::kCertificate},
               {"coordinator.cert", &c.cert, PemKind::kCertificate},
               {"coordinator.key", &c.key, PemKind::kPrivateKey}};
  for (const auto& file : files) {
    if (file.path->empty()) continue;
    *file.path = Resolve(config.agent.state_dir, *file.path);
    if (std::string problem = CheckPemFile(*file.path, file.kind); !problem.empty()) {
      errors.Add(file.key, problem);
    }
  }
  if (c.lease_ttl_ms < kMinLeaseTtlMs || c.lease_ttl_ms > kMaxLeaseTtlMs) {
    errors.Add("coordinator.lease_ttl_ms",
               fmt::format("must be from {} to {} (etcd refuses shorter leases), got {}",
                           kMinLeaseTtlMs, kMaxLeaseTtlMs, c.lease_ttl_ms));
  } else if (c.suspend_after_ms == 0) {
    c.suspend_after_ms = c.lease_ttl_ms * 2 / 3;
  } else if (c.suspend_after_ms >= c.lease_ttl_ms || c.suspend_after_ms < c.lease_ttl_ms / 3) {
    errors.Add(
        "coordinator.suspend_after_ms",
        fmt::format("must be at least lease_ttl_ms / 3 ({}: shorter fences a primary on brief etcd "
                    "hiccups) and less than "
                    "lease_ttl_ms ({}: a primary must stop before its lease can end), "
                    "got {}",
                    c.lease_ttl_ms / 3, c.lease_ttl_ms, c.suspend_after_ms));
  }
  if (!c.witness.empty()) {
    if (!IsSiteName(c.witness)) {
      errors.Add("coordinator.witness",
                 fmt::format("\"{}\" is not a site name ([a-z0-9-]{{1,63}})", c.witness));
    }
    for (size_t i = 0; i < config.groups.size(); ++i) {
      const GroupConfig& g = config.groups[i];
      bool holds = g.primary == c.witness || config.agent.site == c.witness;
      for (const PeerConfig& p : g.peers) holds = holds || p.site == c.witness;
      if (holds) {
        errors.Add("coordinator.witness",
                   fmt::format("\"{}\" holds group \"{}\": a witness runs only an etcd member",
                               c.witness, g.name));
        break;
      }
    }
  }
  if (c.timeout_ms < 100 || c.timeout_ms > 60'000) {
    errors.Add("coordinator.timeout_ms",
               fmt::format("must be from 100 to 60000, got {}", c.timeout_ms));
  }
  if (c.anti_flap_ms > 86'400'000) {
    errors.Add("coordinator.anti_flap_ms",
               fmt::format("must be at most 86400000 (1 day), got {}", c.anti_flap_ms));
  }
}

void ValidateInto(Config& config, Errors& errors) {
  ValidateAgent(config.agent, errors);
  ValidateLog(config.log, config.agent.state_dir, errors);
  ValidateNbd(config.nbd, config.agent.state_dir, errors);
  ValidateGroups(config, errors);
  ValidateTls(config, errors);
  ValidateReplication(config, errors);
  ValidateAcl(config, errors);
  ValidateControl(config, errors);
  ValidateMetrics(config, errors);
  ValidateCoordinator(config, errors);
}

}  // namespace

std::string ListenAddress::ToString() const {
  if (host.find(':') != std::string::npos) return fmt::format("[{}]:{}", host, port);
  return fmt::format("{}:{}", host, port);
}

absl::StatusOr<ListenAddress> ParseListenAddress(std::string_view text) {
  auto fail = [&](std::string_view why) {
    return absl::InvalidArgumentError(fmt::format(
        "invalid listen address \"{}\": {} (want host:port, e.g. \"127.0.0.1:10809\" or "
        "\"[::1]:10809\")",
        text, why));
  };
  ListenAddress address;
  std::string_view port;
  int family = AF_INET;
  if (!text.empty() && text.front() == '[') {
    const size_t close = text.find(']');
    if (close == std::string_view::npos) return fail("missing ']'");
    address.host = std::string(text.substr(1, close - 1));
    if (text.size() == close + 1 || text[close + 1] != ':') return fail("missing \":port\"");
    port = text.substr(close + 2);
    family = AF_INET6;
  } else {
    const size_t colon = text.rfind(':');
    if (colon == std::string_view::npos) return fail("missing \":port\"");
    address.host = std::string(text.substr(0, colon));
    if (address.host.find(':') != std::string::npos) {
      return fail("an IPv6 address must be in brackets");
    }
    port = text.substr(colon + 1);
  }
  unsigned char buffer[sizeof(struct in6_addr)];
  if (address.host.empty() || ::inet_pton(family, address.host.c_str(), buffer) != 1) {
    return fail(fmt::format("\"{}\" is not an {} address (host names are not resolved)",
                            address.host, family == AF_INET ? "IPv4" : "IPv6"));
  }
  uint32_t port_number = 0;
  const auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), port_number);
  if (port.empty() || ec != std::errc() || end != port.data() + port.size() || port_number == 0 ||
      port_number > 65535) {
    return fail(fmt::format("port must be 1..65535, got \"{}\"", port));
  }
  address.port = static_cast<uint16_t>(port_number);
  return address;
}

absl::StatusOr<ListenAddress> ParseDialAddress(std::string_view text) {
  absl::StatusOr<ListenAddress> literal = ParseListenAddress(text);
  if (literal.ok()) return literal;
  const size_t colon = text.rfind(':');
  const std::string_view host = text.substr(0, colon == std::string_view::npos ? 0 : colon);
  // Meant as an IP literal (bracketed, unbracketed IPv6, or digits and dots): the listen-address
  // message says what is wrong with it.
  if (colon == std::string_view::npos || text.front() == '[' ||
      host.find(':') != std::string_view::npos ||
      host.find_first_not_of("0123456789.") == std::string_view::npos) {
    return literal.status();
  }
  auto fail = [&](std::string_view why) {
    return absl::InvalidArgumentError(
        fmt::format("invalid address \"{}\": {} (want host:port, e.g. \"192.0.2.10:7301\", "
                    "\"[2001:db8::1]:7301\" or \"site-b.example.net:7301\")",
                    text, why));
  };
  const bool name_chars = std::all_of(host.begin(), host.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '.';
  });
  if (!name_chars || host.size() > kMaxTlsNameLength || host.front() == '.' ||
      host.front() == '-' || host.back() == '.' || host.find("..") != std::string_view::npos) {
    return fail(fmt::format("\"{}\" is neither an IP address nor a host name", host));
  }
  const std::string_view port = text.substr(colon + 1);
  uint32_t port_number = 0;
  const auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), port_number);
  if (port.empty() || ec != std::errc() || end != port.data() + port.size() || port_number == 0 ||
      port_number > 65535) {
    return fail(fmt::format("port must be 1..65535, got \"{}\"", port));
  }
  return ListenAddress{std::string(host), static_cast<uint16_t>(port_number)};
}

std::string_view PeerModeName(PeerMode mode) {
  switch (mode) {
    case PeerMode::kAsync:
      return "async";
    case PeerMode::kSync:
      return "sync";
  }
  return "unknown";
}

std::string_view CompressionName(Compression compression) {
  switch (compression) {
    case Compression::kNone:
      return "none";
    case Compression::kLz4:
      return "lz4";
    case Compression::kZstd:
      return "zstd";
  }
  return "unknown";
}

bool Config::HasPeers() const {
  return std::any_of(groups.begin(), groups.end(),
                     [](const GroupConfig& group) { return !group.peers.empty(); });
}

absl::Status AuthorizePeer(const Config& config, const std::vector<std::string>& identities,
                           std::string_view claimed_site, std::string_view group) {
  auto matches = [&](const AclConfig& entry) {
    // "*" is only ever valid without TLS; do not let a Config built in code widen it.
    if (entry.identity == kAnyIdentity) return config.tls.insecure;
    return std::find(identities.begin(), identities.end(), entry.identity) != identities.end();
  };
  std::string sites_of_identity;
  std::string groups_of_site;
  for (const AclConfig& entry : config.acl) {
    if (!matches(entry)) continue;
    if (entry.site != claimed_site) {
      sites_of_identity +=
          fmt::format("{}\"{}\"", sites_of_identity.empty() ? "" : ", ", entry.site);
      continue;
    }
    if (AclAllowsGroup(entry, group)) return absl::OkStatus();
    for (const std::string& g : entry.groups) {
      groups_of_site += fmt::format("{}{}", groups_of_site.empty() ? "" : ", ", g);
    }
  }
  std::string who;
  for (const std::string& identity : identities) {
    who += fmt::format("{}\"{}\"", who.empty() ? "" : ", ", identity);
  }
  if (who.empty()) who = config.tls.insecure ? "(none: insecure mode)" : "(no certificate)";
  if (!groups_of_site.empty()) {
    return absl::PermissionDeniedError(
        fmt::format("not authorised: site \"{}\" (identity {}) may not replicate group \"{}\" "
                    "(its [[acl]] allows: {})",
                    claimed_site, who, group, groups_of_site));
  }
  if (!sites_of_identity.empty()) {
    return absl::PermissionDeniedError(
        fmt::format("not authorised: identity {} may act as site {} only, not \"{}\"", who,
                    sites_of_identity, claimed_site));
  }
  return absl::PermissionDeniedError(fmt::format(
      "not authorised: no [[acl]] entry for identity {} (claiming site \"{}\", group \"{}\")", who,
      claimed_site, group));
}

absl::StatusOr<uint64_t> ParseSize(std::string_view text) {
  auto fail = [&](std::string_view why) {
    return absl::InvalidArgumentError(fmt::format("invalid size \"{}\": {}", text, why));
  };
  constexpr std::string_view kUnits =
      "sizes take a plain integer (bytes) or an integer with a binary unit: B, KiB, MiB, GiB, TiB "
      "(decimal units such as k, M, G, KB, MB, GB are not accepted)";
  uint64_t value = 0;
  const char* begin = text.data();
  const char* end = text.data() + text.size();
  const auto [rest, ec] = std::from_chars(begin, end, value);
  if (ec == std::errc::result_out_of_range) return fail("too large for 64 bits");
  if (ec != std::errc())
    return fail(fmt::format("must start with a non-negative integer; {}", kUnits));
  std::string_view unit(rest, static_cast<size_t>(end - rest));
  if (!unit.empty() && (unit.front() == '.' || unit.front() == 'e' || unit.front() == 'E')) {
    return fail("fractions are not accepted; use a smaller unit (e.g. \"1536MiB\" for 1.5 GiB)");
  }
  if (!unit.empty() && unit.front() == ' ') unit.remove_prefix(1);
  static constexpr std::pair<std::string_view, uint64_t> kMultipliers[] = {{"", 1},
                                                                           {"B", 1},
                                                                           {"KiB", 1ull << 10},
                                                                           {"MiB", 1ull << 20},
                                                                           {"GiB", 1ull << 30},
                                                                           {"TiB", 1ull << 40}};
  for (const auto& [name, multiplier] : kMultipliers) {
    if (unit != name) continue;
    if (value > std::numeric_limits<uint64_t>::max() / multiplier)
      return fail("too large for 64 bits");
    return value * multiplier;
  }
  return fail(fmt::format("unknown unit \"{}\"; {}", unit, kUnits));
}

std::string FormatSize(uint64_t size_bytes) {
  static constexpr std::pair<std::string_view, uint64_t> kUnits[] = {
      {"TiB", 1ull << 40}, {"GiB", 1ull << 30}, {"MiB", 1ull << 20}, {"KiB", 1ull << 10}};
  for (const auto& [name, multiplier] : kUnits) {
    if (size_bytes != 0 && size_bytes % multiplier == 0) {
      return fmt::format("{} {}", size_bytes / multiplier, name);
    }
  }
  return fmt::format("{} B", size_bytes);
}

absl::Status Validate(Config& config) {
  const Positions none;
  Errors errors(config.source, &none);
  ValidateInto(config, errors);
  return errors.ToStatus();
}

absl::StatusOr<Config> ParseConfig(std::string_view text, std::string_view file_name_for_errors,
                                   std::optional<std::filesystem::path> state_dir_override) {
  Config config;
  config.source = file_name_for_errors.empty() ? "<config>" : std::string(file_name_for_errors);
  toml::table root;
  try {
    root = toml::parse(text, std::string_view(config.source));
  } catch (const toml::parse_error& e) {
    return absl::InvalidArgumentError(fmt::format("{}:{}:{}: parse error: {}", config.source,
                                                  e.source().begin.line, e.source().begin.column,
                                                  e.description()));
  } catch (const std::exception& e) {
    return absl::InternalError(fmt::format("{}: cannot parse: {}", config.source, e.what()));
  }
  Positions positions;
  Errors errors(config.source, &positions);
  Reader(&errors, &positions).ReadRoot(root, &config);
  if (!errors.empty()) return errors.ToStatus();

  if (state_dir_override.has_value()) {
    std::error_code ec;
    fs::path absolute = fs::absolute(*state_dir_override, ec);
    if (ec) {
      return absl::InvalidArgumentError(
          fmt::format("--state-dir \"{}\": {}", state_dir_override->string(), ec.message()));
    }
    config.agent.state_dir = absolute;
  }
  ValidateInto(config, errors);
  if (!errors.empty()) return errors.ToStatus();
  return config;
}

absl::StatusOr<Config> LoadConfig(const std::filesystem::path& file,
                                  std::optional<std::filesystem::path> state_dir_override) {
  auto os_error = [&](std::string_view what, int error) {
    const std::string message =
        fmt::format("cannot {} config file \"{}\": {}", what, file.string(), std::strerror(error));
    if (error == ENOENT) return absl::NotFoundError(message);
    if (error == EACCES) return absl::PermissionDeniedError(message);
    return absl::FailedPreconditionError(message);
  };
  const int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return os_error("open", errno);
  std::string text;
  absl::Status status;
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    status = os_error("stat", errno);
  } else if (!S_ISREG(st.st_mode)) {
    status = absl::InvalidArgumentError(
        fmt::format("config file \"{}\" is not a regular file", file.string()));
  } else {
    // Read one byte past the limit to tell "at the limit" from "too large".
    text.resize(kMaxConfigFileBytes + 1);
    size_t read_bytes = 0;
    while (read_bytes < text.size()) {
      const ssize_t n = ::read(fd, text.data() + read_bytes, text.size() - read_bytes);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        status = os_error("read", errno);
        break;
      }
      if (n == 0) break;
      read_bytes += static_cast<size_t>(n);
    }
    text.resize(read_bytes);
  }
  ::close(fd);
  if (!status.ok()) return status;
  if (text.size() > kMaxConfigFileBytes) {
    return absl::InvalidArgumentError(fmt::format("config file \"{}\" is larger than {}",
                                                  file.string(), FormatSize(kMaxConfigFileBytes)));
  }
  return ParseConfig(text, file.string(), std::move(state_dir_override));
}

}  // namespace tvilling::ops
