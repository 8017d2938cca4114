// libtorch's per-device autocast state, for Rust.
//
// tch 0.26 binds only `at::autocast::set_enabled`, which since PyTorch 2.4
// means CUDA alone; `torch.autocast(device_type, dtype)` drives the per-device
// functions below. Each wrapper catches C++ exceptions: none may cross into
// Rust.
#include <ATen/autocast_mode.h>

extern "C" {

// Sets autocast for `device` (a c10::DeviceType) to `enabled` with `dtype`
// (a c10::ScalarType); stores the previous state in `was_enabled` and
// `was_dtype`. Returns 0, or -1 when libtorch threw.
int vtp_autocast_set(int device, int enabled, int dtype, int *was_enabled, int *was_dtype) {
  try {
    auto type = static_cast<c10::DeviceType>(device);
    *was_enabled = at::autocast::is_autocast_enabled(type) ? 1 : 0;
    *was_dtype = static_cast<int>(at::autocast::get_autocast_dtype(type));
    at::autocast::set_autocast_dtype(type, static_cast<c10::ScalarType>(dtype));
    at::autocast::set_autocast_enabled(type, enabled != 0);
    return 0;
  } catch (...) {
    return -1;
  }
}

// Whether autocast is on for `device`: 1 or 0, or -1 when libtorch threw.
int vtp_autocast_is_enabled(int device) {
  try {
    return at::autocast::is_autocast_enabled(static_cast<c10::DeviceType>(device)) ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

// Enters an autocast region (as `torch.autocast.__enter__` does).
int vtp_autocast_enter() {
  try {
    return at::autocast::increment_nesting();
  } catch (...) {
    return -1;
  }
}

// Leaves an autocast region; the outermost exit clears the cache of casts.
int vtp_autocast_exit() {
  try {
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    return 0;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"
