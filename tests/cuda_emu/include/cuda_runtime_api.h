// Stub for the host emulator (tests/cuda_emu): everything lives in cuda_emu.h.
#pragma once
#include "../cuda_emu.h"
