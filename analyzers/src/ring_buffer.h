#ifndef LOSSGUARD_ANALYZERS_SRC_RING_BUFFER_H_
#define LOSSGUARD_ANALYZERS_SRC_RING_BUFFER_H_

#include <cassert>
#include <cstddef>
#include <vector>

namespace lossguard::analyzers {

// A fixed-capacity FIFO that overwrites its oldest element when full.
// Not thread-safe.
template <typename T>
class RingBuffer {
 public:
  explicit RingBuffer(size_t capacity) : data_(capacity) {
    assert(capacity > 0);
  }

  void Push(const T& value) {
    data_[head_] = value;
    head_ = (head_ + 1) % data_.size();
    if (size_ < data_.size()) ++size_;
  }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  // i = 0 is the newest element; requires i < size().
  const T& FromBack(size_t i) const {
    assert(i < size_);
    return data_[(head_ + data_.size() - 1 - i) % data_.size()];
  }

 private:
  std::vector<T> data_;
  size_t head_ = 0;
  size_t size_ = 0;
};

}  // namespace lossguard::analyzers

#endif  // LOSSGUARD_ANALYZERS_SRC_RING_BUFFER_H_
