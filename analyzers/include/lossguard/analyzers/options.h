#ifndef LOSSGUARD_ANALYZERS_OPTIONS_H_
#define LOSSGUARD_ANALYZERS_OPTIONS_H_

namespace lossguard::analyzers {

// Every threshold of the curve analyzer, with its default. The statistics
// are scale-free (ratios, log-loss, robust z-scores), so one set of defaults
// serves loss 0.01 and loss 10, 300-step and 300,000-step runs.
struct AnalyzerOptions {
  // Filled in by curve_analyzer.cc's detectors.
  int min_points = 8;
};

}  // namespace lossguard::analyzers

#endif  // LOSSGUARD_ANALYZERS_OPTIONS_H_
