// divergent.cc: `tvillingctl divergent show|export` (divergent.h).
#include "agent/cli/divergent.h"

#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <fstream>
#include <vector>

#include "agent/cli/ctl.h"
#include "storage/divergent_file.h"

namespace tvilling::cli {
namespace {

std::string JsonString(std::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += fmt::format("\\u{:04x}", static_cast<unsigned>(static_cast<unsigned char>(c)));
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

std::string RecordJson(const storage::DivergentRecord& r) {
  return fmt::format(
      "{{\"lsn\":{},\"epoch\":{},\"type\":{},\"volume\":{},\"offset\":{},\"length\":{},"
      "\"flags\":{},\"timestamp_ns\":{},\"checksum\":\"{:016x}\",\"checksum_ok\":{}{}}}",
      r.lsn, r.header.epoch, JsonString(storage::RecordTypeName(r.header.type)), r.header.volume,
      r.header.offset, r.header.length, r.header.flags, r.header.timestamp_ns, r.header.checksum,
      r.checksum_ok ? "true" : "false", r.checksum_ok ? "" : ",\"error\":" + JsonString(r.error));
}

std::string FileJsonHead(const std::filesystem::path& path, const storage::DivergentFileInfo& i) {
  return fmt::format(
      "{{\"path\":{},\"group\":{},\"fork_lsn\":{},\"first_lsn\":{},\"last_lsn\":{},"
      "\"saved_unix_ns\":{},\"primary_site\":{},\"primary_epoch\":{}",
      JsonString(path.string()), JsonString(i.group), i.fork_lsn, i.first_lsn, i.last_lsn,
      i.saved_unix_ns, JsonString(i.primary_site), i.primary_epoch);
}

// The divergent files in `dir`, by name (the names sort by group, then fork LSN digits, so
// sort by the saved time inside instead: read each header).
std::vector<std::filesystem::path> ListFiles(const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> files;
  std::error_code ec;
  for (auto it = std::filesystem::directory_iterator(dir, ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.empty() || name[0] == '.') continue;  // a save in progress
    if (name.size() < 6 || name.substr(name.size() - 6) != storage::kDivergentSuffix) continue;
    files.push_back(it->path());
  }
  std::sort(files.begin(), files.end());
  return files;
}

}  // namespace

DivergentCommands AddDivergentCommands(CLI::App& app, DivergentArgs* args) {
  CLI::App* div = app.add_subcommand(
      "divergent",
      "records a replica saved when it rejoined after a divergence (agent may be "
      "stopped)");
  div->require_subcommand(1);
  DivergentCommands c;
  c.show = div->add_subcommand("show", "list the saved files and their records");
  c.show->add_option("--group", args->group, "only this group's files");
  c.show->add_option("--dir", args->dir, "the files' directory (default STATE_DIR/divergent)")
      ->type_name("DIR");
  c.show->add_flag("--json", args->json, "print JSON (docs/tvillingctl.md)");
  c.export_ = div->add_subcommand("export", "write a file's payloads for recovery");
  c.export_->add_option("--file", args->file, "the divergent file")->required()->type_name("FILE");
  c.export_->add_option("--out", args->out, "the directory to write (created)")
      ->required()
      ->type_name("DIR");
  return c;
}

int DivergentShow(const std::filesystem::path& dir, const DivergentArgs& args, std::ostream& out,
                  std::ostream& err) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    if (args.json) {
      out << "{\"dir\":" << JsonString(dir.string()) << ",\"files\":[]}\n";
    } else {
      out << "no divergent records: " << dir.string() << " does not exist\n";
    }
    return kExitOk;
  }
  int rc = kExitOk;
  std::string json = "{\"dir\":" + JsonString(dir.string()) + ",\"files\":[";
  bool first_file = true;
  int shown = 0;
  for (const std::filesystem::path& path : ListFiles(dir)) {
    storage::DivergentFileInfo info;
    std::vector<storage::DivergentRecord> records;
    absl::Status st =
        storage::ReadDivergentFile(path, &info, [&](const storage::DivergentRecord& r) {
          if (!args.group.empty() && info.group != args.group) return absl::CancelledError("skip");
          records.push_back(r);
          records.back().payload.clear();  // show does not print payloads
          return absl::OkStatus();
        });
    if (st.code() == absl::StatusCode::kCancelled) continue;
    if (!args.group.empty() && info.group != args.group && st.ok()) continue;
    if (!st.ok()) {
      rc = kExitDamaged;
      err << "tvillingctl: " << st.message() << '\n';
    }
    ++shown;
    if (args.json) {
      json += (first_file ? "" : ",") + FileJsonHead(path, info) +
              fmt::format(",\"complete\":{},\"error\":{},\"records\":[", st.ok() ? "true" : "false",
                          JsonString(st.ok() ? std::string() : std::string(st.message())));
      first_file = false;
      for (size_t i = 0; i < records.size(); ++i) {
        json += (i ? "," : "") + RecordJson(records[i]);
      }
      json += "]}";
      continue;
    }
    out << fmt::format(
        "{}\n  group {}  fork LSN {}  records {}..{}  from primary {} (epoch {}){}\n",
        path.string(), info.group, info.fork_lsn, info.first_lsn, info.last_lsn, info.primary_site,
        info.primary_epoch, st.ok() ? "" : "  DAMAGED");
    out << fmt::format("  {:>10} {:>6} {:<12} {:>6} {:>14} {:>10}  {}\n", "LSN", "EPOCH", "TYPE",
                       "VOLUME", "OFFSET", "LENGTH", "CHECKSUM");
    for (const auto& r : records) {
      out << fmt::format("  {:>10} {:>6} {:<12} {:>6} {:>14} {:>10}  {}\n", r.lsn, r.header.epoch,
                         storage::RecordTypeName(r.header.type), r.header.volume, r.header.offset,
                         r.header.length, r.checksum_ok ? "ok" : "BAD: " + r.error);
    }
  }
  if (args.json) {
    out << json << "]}\n";
  } else if (shown == 0) {
    out << "no divergent records in " << dir.string()
        << (args.group.empty() ? "" : " for group " + args.group) << '\n';
  }
  return rc;
}

int DivergentExport(const DivergentArgs& args, std::ostream& out, std::ostream& err) {
  const std::filesystem::path dir = args.out;
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    err << "tvillingctl: creating " << dir.string() << ": " << ec.message() << '\n';
    return kExitUsage;
  }
  storage::DivergentFileInfo info;
  std::string manifest;
  size_t n = 0, written = 0;
  absl::Status st = storage::ReadDivergentFile(
      args.file, &info, [&](const storage::DivergentRecord& r) -> absl::Status {
        std::string entry = RecordJson(r);
        if (r.header.type == storage::RecordType::kWrite) {
          const std::string name =
              fmt::format("lsn-{}-vol{}-off{}-len{}{}.bin", r.lsn, r.header.volume, r.header.offset,
                          r.header.length, r.checksum_ok ? "" : "-BAD");
          std::ofstream f(dir / name, std::ios::binary | std::ios::trunc);
          f.write(r.payload.data(), static_cast<std::streamsize>(r.payload.size()));
          f.close();
          if (!f) return absl::InternalError(fmt::format("writing {}", (dir / name).string()));
          entry.insert(entry.size() - 1, ",\"file\":" + JsonString(name));
          ++written;
        }
        manifest += (n++ ? "," : "") + entry;
        return absl::OkStatus();
      });
  {
    std::ofstream m(dir / "manifest.json", std::ios::trunc);
    m << FileJsonHead(args.file, info) << ",\"complete\":" << (st.ok() ? "true" : "false")
      << ",\"records\":[" << manifest << "]}\n";
  }
  out << fmt::format(
      "{} record(s) of {} (group {}, fork LSN {}): {} payload file(s) and "
      "manifest.json in {}\n",
      n, args.file, info.group, info.fork_lsn, written, dir.string());
  if (!st.ok()) {
    err << "tvillingctl: " << st.message() << '\n';
    return st.code() == absl::StatusCode::kNotFound ? kExitUsage : kExitDamaged;
  }
  return kExitOk;
}

}  // namespace tvilling::cli
