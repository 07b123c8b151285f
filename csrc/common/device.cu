#include "common/device.h"

#include <cuda_runtime.h>

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

int driver_version() {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) return 0;
  return version;
}

}  // namespace lepton
