//! Fuzz target: the AdmissionReview reader, on any bytes.
//!
//! The input is a whole request body, sent to both endpoints (the pod
//! mutator and the policy validator) of a webhook configured like the one
//! in `webhook/tests/common`. Whatever the bytes, the handler must answer
//! 200 or 400 (never panic, never 500), with a body; a 200 must be an
//! `admission.k8s.io/v1` AdmissionReview that echoes the request's uid and
//! says whether it is allowed, and any patch must be base64 of a non-empty
//! JSON array of operations, typed `JSONPatch`. For the policy endpoint a
//! review of the policy ConfigMap is denied exactly when
//! `Policy::from_configmap_data` refuses its data, so the webhook and the
//! controller cannot disagree about the same bytes.
//!
//! `webhook/tests/fuzz.rs` checks the same contract with proptest on
//! stable; this target explores from real reviews by coverage instead.
//!
//! The check itself is `counterweight_fuzz_props::admission_review::check`, which the
//! normal suite also runs on every file of `fuzz/corpus/admission_review/`.

#![no_main]

use counterweight_fuzz::timed;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| timed("admission_review", data, counterweight_fuzz_props::admission_review::check));
