// Failure reporting shared by the host programs of tests/host: fail() stops the checks at the
// first mismatch, run_checks() prints it (or "<name> host: ok") and returns the exit status.
#pragma once

#include <cstdio>
#include <string>

namespace host_check {

struct Failure {
  std::string what;
};

[[noreturn]] inline void fail(const std::string& what) { throw Failure{what}; }

// Runs body(); 0 when it returns, 1 after printing the Failure it throws.
template <typename Body>
int run_checks(const char* name, Body&& body) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // lines already printed survive a crash
  try {
    body();
  } catch (const Failure& f) {
    std::printf("FAILED: %s\n", f.what.c_str());
    return 1;
  }
  std::printf("%s host: ok\n", name);
  return 0;
}

}  // namespace host_check
