#ifndef LOSSGUARD_WIRE_CONVERT_H_
#define LOSSGUARD_WIRE_CONVERT_H_

#include <cstdint>
#include <optional>

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
analyzers::StepRecord FromProto(const v1::Step& s);
// The inverse (no wall time).
v1::Step ToProto(const analyzers::StepRecord& r);

}  // namespace lossguard::wire

#endif  // LOSSGUARD_WIRE_CONVERT_H_
