// bytes.h: an owned, uninitialised byte buffer that moves but never copies.
//
// Write payloads travel from the NBD socket to the group log in one of these: the socket reads
// straight into it, the log hands it to RocksDB's WriteBatch (the one copy on the write path we
// accept), and nobody zero-fills it first. The log can share the buffer (owner()) with a reader
// that keeps a just-written record beyond its callback: the primary's replicator ships large
// writes from memory instead of reading them back (LogRecordView::payload_owner).
#pragma once

#include <cstddef>
#include <memory>
#include <string_view>
#include <utility>

namespace tvilling::storage {

class Bytes {
 public:
  Bytes() = default;
  static Bytes Allocate(size_t size) {
    Bytes b;
    b.data_ = std::make_shared_for_overwrite<char[]>(size);
    b.size_ = size;
    return b;
  }
  static Bytes Copy(std::string_view s) {
    Bytes b = Allocate(s.size());
    std::char_traits<char>::copy(b.data(), s.data(), s.size());
    return b;
  }
  // A moved-from Bytes is empty (size 0), not a size with no data behind it.
  Bytes(Bytes&& other) noexcept
      : data_(std::move(other.data_)), size_(std::exchange(other.size_, 0)) {}
  Bytes& operator=(Bytes&& other) noexcept {
    data_ = std::move(other.data_);
    size_ = std::exchange(other.size_, 0);
    return *this;
  }

  char* data() { return data_.get(); }
  const char* data() const { return data_.get(); }
  size_t size() const { return size_; }
  std::string_view view() const { return {data_.get(), size_}; }
  // Keeps the bytes alive for whoever holds it (null for an empty Bytes).
  std::shared_ptr<const void> owner() const { return data_; }

 private:
  std::shared_ptr<char[]> data_;
  size_t size_ = 0;
};

}  // namespace tvilling::storage
