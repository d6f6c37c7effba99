// A process-wide choice (an enum) read from an environment variable at its
// first use and changed by a setter afterwards. A bad value in the variable
// fails every read with the parser's message, naming the variable, until a
// setter call chooses a value: a typo is never silently ignored, and never
// stuck for the rest of the process.
#pragma once

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>

namespace fused_rnn {

template <typename Enum>
class EnvChoice {
 public:
  using Parser = Enum (*)(const std::string&);
  EnvChoice(const char* variable, Enum fallback, Parser parse)
      : variable_(variable), fallback_(fallback), parse_(parse) {}

  Enum get() {
    read_once();
    const int value = value_.load();
    TORCH_CHECK_VALUE(value >= 0, error_);
    return static_cast<Enum>(value);
  }

  void set(Enum choice) {
    read_once();  // so that a later first read cannot overwrite the choice
    value_.store(static_cast<int>(choice));
  }

 private:
  void read_once() {
    std::call_once(once_, [this] {
      const char* env = std::getenv(variable_);
      if (env == nullptr || *env == '\0') {
        value_.store(static_cast<int>(fallback_));
        return;
      }
      try {
        value_.store(static_cast<int>(parse_(env)));
      } catch (const c10::Error& e) {
        error_ = std::string(variable_) + "=" + env + ": " + e.what_without_backtrace();
      }
    });
  }

  const char* variable_;
  const Enum fallback_;
  const Parser parse_;
  std::once_flag once_;
  std::atomic<int> value_{-1};
  std::string error_;  // written once, before value_ can be read as valid
};

}  // namespace fused_rnn
