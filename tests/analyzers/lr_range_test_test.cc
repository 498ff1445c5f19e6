#include "lossguard/analyzers/lr_range_test.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

namespace lossguard::analyzers {
namespace {

// A range test as LR finders run it: lr = 1e-7 * 1.06^i up to `max_lr`.
std::vector<double> ExponentialLrs(double max_lr, double start = 1e-7,
                                   double factor = 1.06) {
  std::vector<double> lrs;
  for (double lr = start; lr <= max_lr; lr *= factor) lrs.push_back(lr);
  return lrs;
}

// A linear ramp, as fastai's and Keras' "linear" range tests run it: `n`
// points from `start` to `end`.
std::vector<double> LinearLrs(double start, double end, int n) {
  std::vector<double> lrs;
  for (int i = 0; i < n; ++i) {
    lrs.push_back(start + (end - start) * i / (n - 1));
  }
  return lrs;
}

// Flat at 2.3 below lr 1e-4, falls linearly in log10(lr) to 0.3 at 1e-2,
// flat at 0.3 up to lr 1, then blows up (x10 per third of a decade).
double IdealLoss(double lr) {
  const double x = std::log10(lr);
  if (x < -4) return 2.3;
  if (x < -2) return 2.3 - (x + 4);
  if (x < 0) return 0.3;
  return 0.3 * std::pow(10.0, 3.0 * x);
}

std::vector<double> Losses(const std::vector<double>& lrs,
                           double (*loss_of_lr)(double)) {
  std::vector<double> losses;
  for (double lr : lrs) losses.push_back(loss_of_lr(lr));
  return losses;
}

// Adds minibatch-like noise: Gaussian with this standard deviation, by
// Box-Muller from std::mt19937's raw output (which the standard fixes, unlike
// std::normal_distribution's), so the test data is the same everywhere.
void AddNoise(std::vector<double>& losses, double sigma, unsigned seed) {
  std::mt19937 rng(seed);
  auto uniform = [&rng] {  // in (0, 1]
    return (static_cast<double>(rng()) + 1.0) / 4294967296.0;
  };
  constexpr double kTwoPi = 6.283185307179586;
  for (double& loss : losses) {
    loss += sigma * std::sqrt(-2.0 * std::log(uniform())) *
            std::cos(kTwoPi * uniform());
  }
}

// |log10(a / b)|: the distance of two LRs in decades.
double Decades(double a, double b) { return std::abs(std::log10(a / b)); }

// The suggestion is the geometric middle between the steepest-descent
// region's middle and the minimum's basin's middle, each the geometric
// middle of its ends, and the minimum lies in its basin.
void ExpectSuggestionBetween(const LrSuggestion& s) {
  EXPECT_NEAR(std::log10(s.steep_mid_lr),
              0.5 * (std::log10(s.steep_lo_lr) + std::log10(s.steep_hi_lr)),
              1e-9);
  EXPECT_NEAR(std::log10(s.basin_mid_lr),
              0.5 * (std::log10(s.basin_lo_lr) + std::log10(s.basin_hi_lr)),
              1e-9);
  EXPECT_NEAR(std::log10(s.suggested_lr),
              0.5 * (std::log10(s.steep_mid_lr) + std::log10(s.basin_mid_lr)),
              1e-9);
  EXPECT_LE(s.basin_lo_lr, s.min_loss_lr);
  EXPECT_GE(s.basin_hi_lr, s.min_loss_lr);
  EXPECT_LT(s.steep_mid_lr, s.suggested_lr);
  EXPECT_LT(s.suggested_lr, s.basin_mid_lr);
}

TEST(LrRangeTest, RejectsMismatchedLengths) {
  std::vector<double> lrs = {1e-7, 1e-6};
  std::vector<double> losses = {2.3};
  EXPECT_EQ(SuggestLearningRate(lrs, losses).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LrRangeTest, SuggestsBetweenSteepestDescentAndMinimum) {
  const std::vector<double> lrs = ExponentialLrs(10.0);
  const std::vector<double> losses = Losses(lrs, IdealLoss);
  absl::StatusOr<LrSuggestion> s = SuggestLearningRate(lrs, losses);
  ASSERT_TRUE(s.ok()) << s.status();
  ExpectSuggestionBetween(*s);
  // The descent lr 1e-4 .. 1e-2 is steepest around 1e-3; the loss is at
  // its minimum from lr 1e-2 to 1 (middle 0.1); between them: 1e-2.
  EXPECT_LT(Decades(s->steep_mid_lr, 1e-3), 0.1) << s->evidence;
  EXPECT_LT(Decades(s->basin_lo_lr, 1e-2), 0.2) << s->evidence;
  EXPECT_LT(Decades(s->basin_hi_lr, 1.0), 0.2) << s->evidence;
  EXPECT_LT(Decades(s->suggested_lr, 1e-2), 0.1) << s->evidence;
  // The region is the descent, give or take the smoothing window.
  EXPECT_LT(Decades(s->steep_lo_lr, 1e-4), 0.3) << s->evidence;
  EXPECT_LT(Decades(s->steep_hi_lr, 1e-2), 0.3) << s->evidence;
  EXPECT_LE(s->steep_lo_lr, s->steep_mid_lr);
  EXPECT_GE(s->steep_hi_lr, s->steep_mid_lr);
  EXPECT_LT(Decades(s->steepest_slope_per_decade, -1.0), 0.05);
  // The blow-up past lr 1 is found, and the minimum lies before it.
  EXPECT_GT(s->diverge_lr, 1.0);
  EXPECT_LT(s->diverge_lr, 3.0);
  EXPECT_GE(s->min_loss_lr, 1e-2);
  EXPECT_LT(s->min_loss_lr, s->diverge_lr);
  EXPECT_LT(s->points_used, static_cast<int>(lrs.size()));
  EXPECT_FALSE(s->still_descending);
  EXPECT_NE(s->evidence.find("steepest-descent region"), std::string::npos);
  EXPECT_NE(s->evidence.find("its basin"), std::string::npos);
}

TEST(LrRangeTest, MinimumRightBeforeTheBlowUp) {
  // As real tests often look: past the steep descent (lr 1e-4 .. 1e-2) the
  // loss keeps falling gently (0.1 per decade), down to its minimum at lr
  // 0.3, and blows up beyond it. The basin reaches as far down as the loss
  // is within 5% of the drop (0.1) of its minimum: about a decade, lr
  // 0.03 .. 0.3, middle 0.1; between it and the steep descent: 1e-2.
  auto loss_of_lr = [](double lr) {
    const double x = std::log10(lr);
    if (x < -4) return 2.3;
    if (x < -2) return 2.3 - (x + 4);
    if (x < -0.5) return 0.3 - 0.1 * (x + 2);
    return 0.15 * std::pow(10.0, 3.0 * (x + 0.5));
  };
  const std::vector<double> lrs = ExponentialLrs(10.0);
  std::vector<double> losses;
  for (double lr : lrs) losses.push_back(loss_of_lr(lr));
  AddNoise(losses, 0.02, 27);
  absl::StatusOr<LrSuggestion> s = SuggestLearningRate(lrs, losses);
  ASSERT_TRUE(s.ok()) << s.status();
  ExpectSuggestionBetween(*s);
  EXPECT_LT(Decades(s->steep_mid_lr, 1e-3), 0.25) << s->evidence;
  EXPECT_LT(Decades(s->min_loss_lr, 0.3), 0.25) << s->evidence;
  EXPECT_GT(s->basin_lo_lr, 0.01) << s->evidence;
  EXPECT_LT(s->basin_lo_lr, 0.1) << s->evidence;
  EXPECT_GT(s->basin_hi_lr, 0.2) << s->evidence;
  EXPECT_LT(s->basin_hi_lr, 1.0) << s->evidence;
  EXPECT_LT(Decades(s->suggested_lr, 1e-2), 0.25) << s->evidence;
}

TEST(LrRangeTest, RobustToMinibatchNoise) {
  const std::vector<double> lrs = ExponentialLrs(10.0);
  for (unsigned seed : {1u, 2u, 3u, 4u, 5u}) {
    std::vector<double> losses = Losses(lrs, IdealLoss);
    AddNoise(losses, 0.1, seed);
    absl::StatusOr<LrSuggestion> s = SuggestLearningRate(lrs, losses);
    ASSERT_TRUE(s.ok()) << "seed " << seed << ": " << s.status();
    EXPECT_GE(s->steep_mid_lr, 1e-4) << "seed " << seed;
    EXPECT_LE(s->steep_mid_lr, 1e-2) << "seed " << seed;
    EXPECT_LT(Decades(s->steep_mid_lr, 1e-3), 0.25)
        << "seed " << seed << ": " << s->evidence;
    // The flat bottom's noise moves the basin's ends, but not far.
    EXPECT_LT(Decades(s->suggested_lr, 1e-2), 0.3)
        << "seed " << seed << ": " << s->evidence;
    ExpectSuggestionBetween(*s);
  }
}

TEST(LrRangeTest, PicksTheLargestDescent) {
  // A small early dip (2.3 -> 2.1 around lr 1e-6) before the real descent.
  const std::vector<double> lrs = ExponentialLrs(10.0);
  std::vector<double> losses = Losses(lrs, IdealLoss);
  for (std::size_t i = 0; i < lrs.size(); ++i) {
    const double x = std::log10(lrs[i]);
    if (x > -6.25 && x < -4) losses[i] -= (x < -5.75) ? 0.4 * (x + 6.25) : 0.2;
  }
  AddNoise(losses, 0.05, 13);
  absl::StatusOr<LrSuggestion> s = SuggestLearningRate(lrs, losses);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_LT(Decades(s->steep_mid_lr, 1e-3), 0.25) << s->evidence;
}

TEST(LrRangeTest, RobustToLossSpikes) {
  const std::vector<double> lrs = ExponentialLrs(10.0);
  std::vector<double> losses = Losses(lrs, IdealLoss);
  AddNoise(losses, 0.05, 7);
  // One batch in eleven is five times as hard.
  for (std::size_t i = 0; i < losses.size(); i += 11) losses[i] *= 5;
  absl::StatusOr<LrSuggestion> s = SuggestLearningRate(lrs, losses);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_LT(Decades(s->steep_mid_lr, 1e-3), 0.25) << s->evidence;
  EXPECT_GT(s->diverge_lr, 1.0) << s->evidence;
}

TEST(LrRangeTest, ScaleFreeInTheLoss) {
  const std::vector<double> lrs = ExponentialLrs(10.0);
  std::vector<double> losses = Losses(lrs, IdealLoss);
  AddNoise(losses, 0.1, 11);
  std::vector<double> scaled = losses;
  for (double& loss : scaled) loss *= 1000.0;
  absl::StatusOr<LrSuggestion> a = SuggestLearningRate(lrs, losses);
  absl::StatusOr<LrSuggestion> b = SuggestLearningRate(lrs, scaled);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_DOUBLE_EQ(a->suggested_lr, b->suggested_lr);
}

TEST(LrRangeTest, HandlesCurveThatNeverDiverges) {
  // Stops at lr 0.3: the loss is flat at its minimum to the end.
  const std::vector<double> lrs = ExponentialLrs(0.3);
  std::vector<double> losses = Losses(lrs, IdealLoss);
  AddNoise(losses, 0.05, 3);
  absl::StatusOr<LrSuggestion> s = SuggestLearningRate(lrs, losses);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->diverge_lr, 0.0);
  EXPECT_EQ(s->points_used, static_cast<int>(lrs.size()));
  EXPECT_LT(Decades(s->steep_mid_lr, 1e-3), 0.25) << s->evidence;
  EXPECT_NE(s->evidence.find("did not blow up"), std::string::npos);
}

TEST(LrRangeTest, FlagsCurveStillFallingAtTheEnd) {
  // Stops at lr 3e-3, in the middle of the descent.
  const std::vector<double> lrs = ExponentialLrs(3e-3);
  const std::vector<double> losses = Losses(lrs, IdealLoss);
  absl::StatusOr<LrSuggestion> s = SuggestLearningRate(lrs, losses);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_TRUE(s->still_descending);
  EXPECT_GE(s->suggested_lr, 1e-4);
  EXPECT_LE(s->suggested_lr, 3e-3);
  EXPECT_NE(s->evidence.find("still falling"), std::string::npos);
}

TEST(LrRangeTest, CutsAtNanTail) {
  const std::vector<double> lrs = ExponentialLrs(10.0);
  std::vector<double> losses = Losses(lrs, IdealLoss);
  AddNoise(losses, 0.05, 5);
  std::size_t first_nan = 0;
  while (lrs[first_nan] < 0.1) ++first_nan;
  for (std::size_t i = first_nan; i < losses.size(); ++i) {
    losses[i] = (i % 2 == 0) ? std::numeric_limits<double>::quiet_NaN()
                             : std::numeric_limits<double>::infinity();
  }
  absl::StatusOr<LrSuggestion> s = SuggestLearningRate(lrs, losses);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->points_used, static_cast<int>(first_nan));
  EXPECT_DOUBLE_EQ(s->diverge_lr, lrs[first_nan]);
  EXPECT_LT(Decades(s->steep_mid_lr, 1e-3), 0.25) << s->evidence;
  EXPECT_NE(s->evidence.find("non-finite"), std::string::npos);
}

TEST(LrRangeTest, RejectsTooFewPoints) {
  const std::vector<double> lrs = ExponentialLrs(1e-6);  // 40 points
  std::vector<double> losses(lrs.size(), 2.3);
  LrRangeTestOptions options;
  options.min_points = static_cast<int>(lrs.size()) + 1;
  EXPECT_EQ(SuggestLearningRate(lrs, losses, options).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Default options: 10 points are too few.
  const std::vector<double> few(lrs.begin(), lrs.begin() + 10);
  const std::vector<double> few_losses(10, 2.3);
  EXPECT_EQ(SuggestLearningRate(few, few_losses).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Enough points, but a NaN early leaves too few finite ones.
  losses[5] = std::numeric_limits<double>::quiet_NaN();
  EXPECT_EQ(SuggestLearningRate(lrs, losses).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LrRangeTest, RejectsLrThatDoesNotGrow) {
  std::vector<double> lrs = ExponentialLrs(10.0);
  const std::vector<double> losses = Losses(lrs, IdealLoss);
  std::vector<double> flat_step = lrs;
  flat_step[100] = flat_step[99];
  EXPECT_EQ(SuggestLearningRate(flat_step, losses).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<double> decreasing(lrs.rbegin(), lrs.rend());
  EXPECT_EQ(SuggestLearningRate(decreasing, losses).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<double> zero = lrs;
  zero[0] = 0.0;
  EXPECT_EQ(SuggestLearningRate(zero, losses).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<double> nan_lr = lrs;
  nan_lr[50] = std::numeric_limits<double>::quiet_NaN();
  EXPECT_EQ(SuggestLearningRate(nan_lr, losses).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LrRangeTest, FlatCurveIsAnErrorNotAGuess) {
  const std::vector<double> lrs = ExponentialLrs(10.0);
  for (unsigned seed : {1u, 2u, 3u}) {
    std::vector<double> losses(lrs.size(), 2.3);
    AddNoise(losses, 0.05, seed);
    absl::StatusOr<LrSuggestion> s = SuggestLearningRate(lrs, losses);
    EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition)
        << "seed " << seed << ": "
        << (s.ok() ? s->evidence : std::string(s.status().message()));
    if (!s.ok()) {
      EXPECT_NE(s.status().message().find("no usable descent"),
                std::string::npos);
    }
  }
}

TEST(LrRangeTest, RisingCurveIsAnError) {
  const std::vector<double> lrs = ExponentialLrs(10.0);
  std::vector<double> losses;
  for (double lr : lrs) losses.push_back(1.0 + 0.1 * (std::log10(lr) + 7));
  EXPECT_EQ(SuggestLearningRate(lrs, losses).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(LrRangeTest, SparseTestStillWorks) {
  // 100 iterations over 8 decades (fastai's default num_it): ~12 per decade.
  const std::vector<double> lrs =
      ExponentialLrs(10.0, 1e-7, std::pow(10.0, 8.0 / 99));
  std::vector<double> losses = Losses(lrs, IdealLoss);
  AddNoise(losses, 0.05, 9);
  absl::StatusOr<LrSuggestion> s = SuggestLearningRate(lrs, losses);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_LT(Decades(s->steep_mid_lr, 1e-3), 0.3) << s->evidence;
}

TEST(LrRangeTest, DenseLinearRampIsPooled) {
  // 20000 points from lr 1e-5 to 1: half of them in the last 0.3 decade, so
  // a window of the analysis holds thousands. Pooled into 0.01-decade bins,
  // the curve is analysed as ~100 points per decade (in O(n log n): this
  // test would take seconds, not milliseconds, without the pooling).
  const std::vector<double> lrs = LinearLrs(1e-5, 1.0, 20000);
  std::vector<double> losses = Losses(lrs, IdealLoss);
  AddNoise(losses, 0.1, 17);
  absl::StatusOr<LrSuggestion> s = SuggestLearningRate(lrs, losses);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_LT(Decades(s->steep_mid_lr, 1e-3), 0.3) << s->evidence;
  EXPECT_LE(s->steep_lo_lr, s->steep_mid_lr);
  EXPECT_GE(s->steep_hi_lr, s->steep_mid_lr);
  EXPECT_GE(s->min_loss_lr, 1e-2) << s->evidence;
  EXPECT_EQ(s->diverge_lr, 0.0);
  EXPECT_EQ(s->points_used, static_cast<int>(lrs.size()));
  EXPECT_NE(s->evidence.find("pooled into"), std::string::npos) << s->evidence;
}

TEST(LrRangeTest, DenseRampThatBlowsUp) {
  // A linear ramp to lr 10 puts few points in its lowest decades, so here
  // the curve comes late: flat at 2.3 below lr 1e-2, falling to 0.3 at lr 1,
  // flat up to lr 3.16 and blowing up beyond (x10 per third of a decade).
  auto late_loss = [](double lr) {
    const double x = std::log10(lr);
    if (x < -2) return 2.3;
    if (x < 0) return 2.3 - (x + 2);
    if (x < 0.5) return 0.3;
    return 0.3 * std::pow(10.0, 3.0 * (x - 0.5));
  };
  const std::vector<double> lrs = LinearLrs(1e-5, 10.0, 20000);
  std::vector<double> losses;
  for (double lr : lrs) losses.push_back(late_loss(lr));
  AddNoise(losses, 0.1, 19);
  absl::StatusOr<LrSuggestion> s = SuggestLearningRate(lrs, losses);
  ASSERT_TRUE(s.ok()) << s.status();
  // Within the descent (the few points below lr 1e-2 leave its lower end
  // loose).
  EXPECT_GT(s->suggested_lr, 1e-2) << s->evidence;
  EXPECT_LT(s->suggested_lr, 1.0) << s->evidence;
  EXPECT_GT(s->diverge_lr, 3.16) << s->evidence;
  EXPECT_LT(s->diverge_lr, 10.0) << s->evidence;
  // The cut falls on a point: the first one of the bin where it blew up.
  ASSERT_GT(s->points_used, 0);
  ASSERT_LT(s->points_used, static_cast<int>(lrs.size()));
  EXPECT_EQ(s->diverge_lr, lrs[static_cast<std::size_t>(s->points_used)]);
}

TEST(LrRangeTest, DenseExponentialTestAgreesWithSparse) {
  // x1.002 per step: ~8300 points, ~11 per bin.
  const std::vector<double> lrs = ExponentialLrs(10.0, 1e-7, 1.002);
  for (unsigned seed : {21u, 22u, 23u}) {
    std::vector<double> losses = Losses(lrs, IdealLoss);
    AddNoise(losses, 0.1, seed);
    absl::StatusOr<LrSuggestion> s = SuggestLearningRate(lrs, losses);
    ASSERT_TRUE(s.ok()) << "seed " << seed << ": " << s.status();
    EXPECT_LT(Decades(s->steep_mid_lr, 1e-3), 0.15)
        << "seed " << seed << ": " << s->evidence;
    EXPECT_GT(s->diverge_lr, 1.0) << "seed " << seed << ": " << s->evidence;
    EXPECT_LT(s->diverge_lr, 3.0) << "seed " << seed << ": " << s->evidence;
  }
  // A dense flat curve is still an error, not a guess.
  std::vector<double> flat(lrs.size(), 2.3);
  AddNoise(flat, 0.1, 24);
  EXPECT_EQ(SuggestLearningRate(lrs, flat).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(LrRangeTest, SparseTestIsAnalysedPointByPoint) {
  // At x1.06 per step every bin holds one point: pooling changes nothing.
  const std::vector<double> lrs = ExponentialLrs(10.0);
  std::vector<double> losses = Losses(lrs, IdealLoss);
  AddNoise(losses, 0.1, 25);
  LrRangeTestOptions unpooled;
  unpooled.pool_decades = 1e-9;
  absl::StatusOr<LrSuggestion> a = SuggestLearningRate(lrs, losses);
  absl::StatusOr<LrSuggestion> b = SuggestLearningRate(lrs, losses, unpooled);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->suggested_lr, b->suggested_lr);
  EXPECT_EQ(a->steep_lo_lr, b->steep_lo_lr);
  EXPECT_EQ(a->steep_hi_lr, b->steep_hi_lr);
  EXPECT_EQ(a->min_loss_lr, b->min_loss_lr);
  EXPECT_EQ(a->basin_lo_lr, b->basin_lo_lr);
  EXPECT_EQ(a->basin_hi_lr, b->basin_hi_lr);
  EXPECT_EQ(a->diverge_lr, b->diverge_lr);
  EXPECT_EQ(a->evidence, b->evidence);
  EXPECT_EQ(a->evidence.find("pooled"), std::string::npos);
}

TEST(LrRangeTest, RejectsBadOptions) {
  const std::vector<double> lrs = ExponentialLrs(10.0);
  const std::vector<double> losses = Losses(lrs, IdealLoss);
  LrRangeTestOptions options;
  options.fit_half_width_decades = 0.0;
  EXPECT_EQ(SuggestLearningRate(lrs, losses, options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options = LrRangeTestOptions();
  options.divergence_factor = 1.0;
  EXPECT_EQ(SuggestLearningRate(lrs, losses, options).status().code(),
            absl::StatusCode::kInvalidArgument);
  for (double pool : {0.0, -0.01, std::numeric_limits<double>::infinity(),
                      std::numeric_limits<double>::quiet_NaN()}) {
    options = LrRangeTestOptions();
    options.pool_decades = pool;
    EXPECT_EQ(SuggestLearningRate(lrs, losses, options).status().code(),
              absl::StatusCode::kInvalidArgument)
        << "pool_decades " << pool;
  }
  for (double fraction : {-0.1, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
    options = LrRangeTestOptions();
    options.basin_fraction = fraction;
    EXPECT_EQ(SuggestLearningRate(lrs, losses, options).status().code(),
              absl::StatusCode::kInvalidArgument)
        << "basin_fraction " << fraction;
  }
  options = LrRangeTestOptions();
  options.basin_sigmas = -1.0;
  EXPECT_EQ(SuggestLearningRate(lrs, losses, options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace lossguard::analyzers
