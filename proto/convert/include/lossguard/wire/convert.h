#ifndef LOSSGUARD_WIRE_CONVERT_H_
#define LOSSGUARD_WIRE_CONVERT_H_

#include <cstdint>
#include <optional>

#include "lossguard/analyzers/lr_range_test.h"
#include "lossguard/analyzers/types.h"
#include "lossguard/policy/advice_policy.h"
#include "lossguard/v1/lossguard.pb.h"

// Conversions between the wire messages (lossguard.v1) and the analyzer's
// and policy's own types, shared by the daemon and the embedded guard.
namespace lossguard::wire {

namespace v1 = ::lossguard::v1;

v1::DiagnosisKind ToProto(analyzers::DiagnosisKind kind);
// The inverse; nullopt for DIAGNOSIS_KIND_UNSPECIFIED or an unknown value.
std::optional<analyzers::DiagnosisKind> FromProto(v1::DiagnosisKind kind);
v1::Diagnosis ToProto(const analyzers::Diagnosis& d);
// The policy's advice as a wire Advice (action unset for kNone).
v1::Advice ToProto(const policy::Advice& a, const analyzers::Diagnosis& d,
                   uint64_t advice_id);
// The inverse, for an advice read back from the store: what the policy
// needs to remember it (policy::ObserveAdvice). `lr_when_sent` is the run's
// LR when it was sent (AdviceRecord::lr_when_sent), from which the LR it
// set and whether it raised the LR follow; a raise gets the watch window
// Decide gave it (Advice::ramp_until). Not restored: the guard rail that
// blocked it (so no cooldown deferral comes back), the words.
policy::Advice FromProto(const v1::Advice& p, double lr_when_sent,
                         const policy::PolicyOptions& options);
analyzers::StepRecord FromProto(const v1::Step& s);
// The inverse (no wall time).
v1::Step ToProto(const analyzers::StepRecord& r);
v1::LrSuggestion ToProto(const analyzers::LrSuggestion& s);

}  // namespace lossguard::wire

#endif  // LOSSGUARD_WIRE_CONVERT_H_
