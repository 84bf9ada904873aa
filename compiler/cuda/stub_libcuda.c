/* A stand-in libcuda.so.1 for compiling CUDA with TVM on a machine without a GPU (see compiler/cuda_cross.py):
   every driver entry point that libtvm_runtime_cuda.so links against answers "no device". */
typedef int CUresult;
#define NODEV 100
CUresult cuDeviceGetName(char* n, int l, int d){return NODEV;}
CUresult cuFuncSetAttribute(void* f, int a, int v){return NODEV;}
CUresult cuGetErrorName(CUresult e, const char** s){static const char* m="CUDA_ERROR_NO_DEVICE (stub libcuda)"; *s=m; return 0;}
CUresult cuGetErrorString(CUresult e, const char** s){static const char* m="no CUDA device (stub libcuda for cross-compiling)"; *s=m; return 0;}
CUresult cuLaunchKernelEx(const void* c, void* f, void** p, void** e){return NODEV;}
CUresult cuModuleGetFunction(void** f, void* m, const char* n){return NODEV;}
CUresult cuModuleLoadData(void** m, const void* i){return NODEV;}
CUresult cuModuleUnload(void* m){return NODEV;}
CUresult cuTensorMapEncodeTiled(void* a, int b, unsigned c, void* d, const void* e, const void* f, const void* g, const void* h, int i, int j, int k, int l){return NODEV;}
