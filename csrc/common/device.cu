#include "common/device.h"

#include <cuda_runtime.h>

#include <mutex>

namespace lepton {

Status query_device(int device, DeviceInfo* info) {
  cudaDeviceProp prop;
  LEPTON_RETURN_IF_CUDA_ERROR(cudaGetDeviceProperties(&prop, device));
  info->index = device;
  info->name = prop.name;
  info->major = prop.major;
  info->minor = prop.minor;
  info->multiprocessors = prop.multiProcessorCount;
  info->l2_bytes = prop.l2CacheSize;
  info->max_shared_per_block_optin = static_cast<int>(prop.sharedMemPerBlockOptin);
  return Status::Ok();
}

const DeviceInfo* cached_device_info(int device) {
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  static DeviceInfo infos[kMaxDevices];
  static bool ok[kMaxDevices];
  if (device < 0 || device >= kMaxDevices) return nullptr;
  std::call_once(once[device], [device] { ok[device] = query_device(device, &infos[device]).ok; });
  return ok[device] ? &infos[device] : nullptr;
}

int driver_version() {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) return 0;
  return version;
}

}  // namespace lepton
