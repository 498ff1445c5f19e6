#ifndef LOSSGUARD_TESTS_ANALYZERS_SYNTHETIC_H_
#define LOSSGUARD_TESTS_ANALYZERS_SYNTHETIC_H_

// Deterministic synthetic training curves for the analyzer tests and
// benchmarks. Header-only; depends only on the standard library and the
// analyzers' public types.
//
// Thread-safety: the generators hold their own random state; use one per
// thread.

#include <cmath>
#include <cstdint>
#include <functional>
#include <numbers>
#include <random>
#include <utility>
#include <vector>

#include "lossguard/analyzers/types.h"

namespace lossguard::analyzers::synthetic {

// Loss of an untrained 10-class classifier: ln(10).
inline constexpr double kL0 = std::numbers::ln10;

// The typical classification curve L(t) = final + (initial - final) e^(-t/tau).
inline double ExpDecay(double t, double initial, double final_loss,
                       double tau) {
  return final_loss + (initial - final_loss) * std::exp(-t / tau);
}

// Multiplicative log-normal noise exp(sigma * N(0,1)) from a fixed seed.
class LogNormalNoise {
 public:
  explicit LogNormalNoise(uint32_t seed) : rng_(seed) {}
  double operator()(double sigma) {
    const double z = normal_(rng_);
    return sigma > 0 ? std::exp(sigma * z) : 1.0;
  }

 private:
  std::mt19937 rng_;
  std::normal_distribution<double> normal_{0.0, 1.0};
};

// A curve defined point by point; every function takes the point's index
// i in [0, points).
struct CurveSpec {
  int64_t points = 1000;
  int64_t first_step = 0;  // step of point 0
  int64_t stride = 1;      // steps between points (an epoch log: 1 per epoch)
  std::function<double(int64_t)> lr = [](int64_t) { return 0.1; };
  // Noiseless training loss; default: the exp-decay curve from ln(10) to
  // 0.3 with tau = 100 steps.
  std::function<double(int64_t)> loss;
  double loss_noise = 0.1;  // sigma of the log-normal minibatch noise
  // Validation loss every `val_every` points (0: none), starting at point
  // val_every - 1; default: 1.1x the noiseless training loss.
  int64_t val_every = 0;
  std::function<double(int64_t)> val_loss;
  double val_noise = 0.01;
  // Gradient norm (none when empty), with log-normal noise.
  std::function<double(int64_t)> grad_norm;
  double grad_noise = 0.2;
  // Scales losses (and validation losses) after noise: scale-free checks.
  double loss_scale = 1.0;
  uint32_t seed = 42;
};

// Streams the records of `spec` one at a time (the 1M-step runs don't need
// them all in memory). Loss, validation and gradient noise come from
// separate streams, so adding validation points does not change the
// training losses.
class CurveStream {
 public:
  explicit CurveStream(CurveSpec spec)
      : spec_(std::move(spec)),
        loss_noise_(spec_.seed),
        val_noise_(spec_.seed + 1),
        grad_noise_(spec_.seed + 2) {
    if (!spec_.loss) {
      spec_.loss = [](int64_t i) {
        return ExpDecay(static_cast<double>(i), kL0, 0.3, 100.0);
      };
    }
    if (spec_.val_every > 0 && !spec_.val_loss) {
      spec_.val_loss = [f = spec_.loss](int64_t i) { return 1.1 * f(i); };
    }
  }

  bool Done() const { return i_ >= spec_.points; }
  int64_t index() const { return i_; }

  StepRecord Next() {
    const int64_t i = i_++;
    StepRecord r;
    r.step = spec_.first_step + i * spec_.stride;
    r.lr = spec_.lr(i);
    r.loss = spec_.loss(i) * loss_noise_(spec_.loss_noise) * spec_.loss_scale;
    if (spec_.val_every > 0 && (i + 1) % spec_.val_every == 0) {
      r.val_loss =
          spec_.val_loss(i) * val_noise_(spec_.val_noise) * spec_.loss_scale;
    }
    if (spec_.grad_norm) {
      r.grad_norm = spec_.grad_norm(i) * grad_noise_(spec_.grad_noise);
    }
    return r;
  }

 private:
  CurveSpec spec_;
  LogNormalNoise loss_noise_;
  LogNormalNoise val_noise_;
  LogNormalNoise grad_noise_;
  int64_t i_ = 0;
};

// All records of `spec`.
inline std::vector<StepRecord> Generate(CurveSpec spec) {
  std::vector<StepRecord> recs;
  recs.reserve(static_cast<size_t>(spec.points));
  CurveStream stream(std::move(spec));
  while (!stream.Done()) recs.push_back(stream.Next());
  return recs;
}

// The same shape as a power law, L(t) = final + (initial - final) *
// (1 + t/t0)^-alpha: a quick early drop, then a long slow tail (long runs).
inline double PowerLaw(double t, double initial, double final_loss, double t0,
                       double alpha) {
  return final_loss + (initial - final_loss) * std::pow(1.0 + t / t0, -alpha);
}

// A healthy run of `points` steps as a realistic trainer logs it: the
// exp-decay curve from ln(10) to 0.3 with time constant `tau`, 10%
// minibatch noise, constant LR 0.1, validation every 50 steps (1.1x the
// training loss, flattening out with it) and a gradient norm that settles
// from 5 to 1 with 20% noise.
inline CurveSpec HealthySpec(int64_t points, double tau, uint32_t seed = 42) {
  CurveSpec spec;
  spec.points = points;
  spec.loss = [tau](int64_t i) {
    return ExpDecay(static_cast<double>(i), kL0, 0.3, tau);
  };
  spec.val_every = 50;
  spec.grad_norm = [tau](int64_t i) {
    return ExpDecay(static_cast<double>(i), 5.0, 1.0, tau);
  };
  spec.seed = seed;
  return spec;
}

// A healthy long run: the power law from ln(10) towards 0.3 (t0 = 50,
// alpha = 0.5), so it still falls slowly after a million steps; otherwise
// as HealthySpec.
inline CurveSpec LongRunSpec(int64_t points, uint32_t seed = 42) {
  CurveSpec spec = HealthySpec(points, 1.0, seed);
  spec.loss = [](int64_t i) {
    return PowerLaw(static_cast<double>(i), kL0, 0.3, 50.0, 0.5);
  };
  spec.grad_norm = [](int64_t i) {
    return PowerLaw(static_cast<double>(i), 5.0, 1.0, 50.0, 0.5);
  };
  return spec;
}

}  // namespace lossguard::analyzers::synthetic

#endif  // LOSSGUARD_TESTS_ANALYZERS_SYNTHETIC_H_
