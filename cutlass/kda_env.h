// Kernel variant switches read from the environment (docs/ffi.md lists them). Host code only; callers cache
// the answer in a function-local static so each switch is read once per process, at the first launch.
#pragma once

#include <cstdlib>
#include <cstring>

namespace flashkda {

// Whether environment variable `name` is set to exactly `value`.
inline bool EnvEquals(const char* name, const char* value) {
  const char* s = std::getenv(name);
  return s != nullptr && std::strcmp(s, value) == 0;
}

// A positive number set through `name`, or `otherwise` when unset or anything else.
inline float EnvPositive(const char* name, float otherwise) {
  const char* s = std::getenv(name);
  const float v = s != nullptr ? static_cast<float>(std::atof(s)) : 0.f;
  return v > 0.f ? v : otherwise;
}

// A column-block width forced through `name` (16, 32 or 64), or 0 when unset or anything else.
inline int EnvColumnBlock(const char* name) {
  const char* s = std::getenv(name);
  const int v = s != nullptr ? std::atoi(s) : 0;
  return (v == 16 || v == 32 || v == 64) ? v : 0;
}

}  // namespace flashkda
