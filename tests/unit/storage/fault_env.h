// fault_env.h: a RocksDB Env for crash tests. It remembers what a power cut would keep and, on
// DropUnsyncedData(), puts the files back to exactly that, so a test can reopen the DB and check
// that what was synced survives and what was not is gone.
//
// The model (after LevelDB's db/fault_injection_test.cc and RocksDB's
// utilities/fault_injection_fs.h), for files and directories reached through env():
// - File data: for every file created or reopened for writing, the size at its last successful
//   Sync/Fsync is durable; bytes appended after it are lost. RangeSync (sync_file_range) only
//   starts writeback and persists no metadata, so it never counts. A file that existed before it
//   was opened for writing keeps the size it had when opened.
// - Names: creating (NewWritableFile of a new name, LinkFile), deleting and renaming are durable
//   only once the directory holding the (new) name is fsynced through an FSDirectory from this
//   env. Otherwise DropUnsyncedData undoes them, newest first: a created file is removed, a deleted
//   file comes back (with its synced data), a rename is reversed and the file it overwrote comes
//   back. So a file whose creation was never made durable disappears even if its data was synced,
//   and one whose creation was (directory fsynced) but whose data never was is left empty.
//   Deleted and overwritten files are kept through an open descriptor until the directory is
//   synced; past kMaxPreservedDeletes pending deletions, further deletions count as durable at
//   once (counted in forgotten_deletes()).
// - Not modelled: directory creation/removal (durable at once), renames across directories
//   (durable with the destination's directory), the info LOG (RocksDB opens it outside the file
//   API), NewRandomRWFile and ReuseWritableFile (refused with NotSupported, so nothing bypasses the
//   model: RocksDB uses them only for features we do not enable, e.g. recycle_log_file_num).
//
// A power cut in a test:
//   env.Crash();                 // from now on writes, syncs and renames fail and change nothing,
//   db.reset();                  // so closing the DB (which may sync the WAL) persists nothing
//   more ASSERT_TRUE(env.DropUnsyncedData().ok());   // back to the durable state; env is live
//   again reopen with env.env() and check.
// DropUnsyncedData also works without Crash() once every file written through the env is closed.
//
// Holding WAL syncs, to see what a program does while an fsync is in flight:
//   env.HoldWalSyncs();          // from now on a Sync/Fsync of a WAL file (*.log) blocks
//   ... start work that fsyncs the WAL; poll env.waiting_wal_syncs() until the sync is held ...
//   ... check what completed (and what must not have) while it is held ...
//   env.ReleaseWalSyncs();       // every held sync goes on; later ones are not held
// A held sync covers what it would had it run at once: the file's size when the sync was called,
// not what is appended while it waits (a real fsync that has started covers no later write). It
// checks Crash() again once released, so Crash() during the hold makes it fail and persist nothing
// (a failed fsync). Other files' syncs, directory fsyncs and RangeSync are never held.
//
// The base file system must be the POSIX one (the default): undo works on real paths.
#pragma once

#include <absl/status/status.h>
#include <rocksdb/env.h>
#include <rocksdb/file_system.h>

#include <cstddef>
#include <cstdint>
#include <memory>

namespace tvilling::storage {

class FaultInjectionFs;

class FaultEnv {
 public:
  static constexpr size_t kMaxPreservedDeletes = 4096;

  explicit FaultEnv(std::shared_ptr<rocksdb::FileSystem> base = rocksdb::FileSystem::Default());
  ~FaultEnv();
  FaultEnv(const FaultEnv&) = delete;
  FaultEnv& operator=(const FaultEnv&) = delete;

  // For rocksdb::Options::env. Lives as long as this FaultEnv; close every DB using it first.
  rocksdb::Env* env() const { return env_.get(); }
  // The same file system as env()->GetFileSystem(), for tests that drive files directly.
  std::shared_ptr<rocksdb::FileSystem> file_system() const;

  // The power cut: every later write, sync, truncate, create, delete and rename through env()
  // fails with IOError and changes nothing on disk. Reads still work. Thread-safe.
  void Crash();
  bool crashed() const;

  // Puts every file back to its durable state (see the model above), forgets all tracking and
  // makes the env live again. REQUIRES: no file written through env() is still open (close the
  // DB first); otherwise FailedPrecondition naming the open files, and nothing is changed.
  absl::Status DropUnsyncedData();

  // Takes what is on disk now as durable: forgets all tracking and makes the env live again, as
  // after a clean shutdown whose every write reached the disk. Same REQUIRES as DropUnsyncedData.
  absl::Status ForgetUnsyncedState();

  // WAL sync holding (see above). Thread-safe. Release before closing a DB that syncs its WAL on
  // close (LogStore does), or the close waits for it.
  void HoldWalSyncs();
  void ReleaseWalSyncs();
  // Syncs of WAL files blocked by HoldWalSyncs() right now.
  size_t waiting_wal_syncs() const;
  // Syncs of WAL files through env() so far, held or not (not those refused after Crash()).
  uint64_t wal_syncs() const;

  // Introspection for tests of the env itself.
  size_t tracked_files() const;
  size_t pending_namespace_ops() const;
  size_t forgotten_deletes() const;

 private:
  std::shared_ptr<FaultInjectionFs> fs_;
  std::unique_ptr<rocksdb::Env> env_;
};

}  // namespace tvilling::storage
