// divergent.h: `tvillingctl divergent show|export`: the records a replica saved before it cut a
// diverged log back to the fork (docs/replication.md, "Rejoin"; docs/operations.md). They read
// the files under <state_dir>/divergent directly, so they work with the agent stopped.
#pragma once

#include <filesystem>
#include <ostream>
#include <string>

namespace CLI {
class App;
}

namespace tvilling::cli {

// A file that cannot be read completely (damaged, truncated, not ours): its records that could
// be read are still shown or exported.
inline constexpr int kExitDamaged = 4;

struct DivergentArgs {
  std::string dir;    // --dir: where the files are (default <state_dir>/divergent)
  std::string group;  // --group: only this group's files
  bool json = false;
  std::string file;  // export --file
  std::string out;   // export --out
};

struct DivergentCommands {
  CLI::App* show = nullptr;
  CLI::App* export_ = nullptr;
};
DivergentCommands AddDivergentCommands(CLI::App& app, DivergentArgs* args);

// `show`: every file in `dir` (of args.group, if set), oldest first, with its records.
int DivergentShow(const std::filesystem::path& dir, const DivergentArgs& args, std::ostream& out,
                  std::ostream& err);
// `export`: each WRITE record's payload as DIR/lsn-<L>-vol<V>-off<O>-len<N>.bin, and
// DIR/manifest.json listing every record (TRIM and WRITE_ZEROES have no payload file).
int DivergentExport(const DivergentArgs& args, std::ostream& out, std::ostream& err);

}  // namespace tvilling::cli
