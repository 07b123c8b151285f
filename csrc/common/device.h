// What the host needs to know about the GPU, read from the device rather than hard-coded.
#pragma once
#include <string>
#include <vector>

#include "common/status.h"

namespace lepton {

struct DeviceInfo {
  int index = -1;
  std::string name;
  int major = 0, minor = 0;
  int multiprocessors = 0;
  int l2_bytes = 0;
  int max_shared_per_block_optin = 0;
};

// Fills `info` for `device`; fails with the CUDA runtime's message when no usable GPU exists.
Status query_device(int device, DeviceInfo* info);

// query_device once per device (launchers read these facts on every call); nullptr when the
// query fails.
const DeviceInfo* cached_device_info(int device);

// Version of the CUDA driver on this machine (e.g. 13000), or 0 when there is none.
int driver_version();

}  // namespace lepton
