//! Fuzz target: the mutating webhook on any valid pod.
//!
//! The input is a pod as JSON. Inputs that are not a pod the API server
//! could hand to the webhook (see [`valid`]) are dropped; the rest are
//! serialized the way the API server sends them (from the typed `Pod`, so
//! without `null`s) and wrapped in a pod CREATE AdmissionReview for an
//! opted-in namespace. The answer must be an allowed review that echoes
//! the uid, read the pod (a pod the API server accepts is never
//! "unreadable" to the webhook's `PodView`), and agree with
//! `counterweight_core::inject::inject` on the typed pod. When it carries a
//! patch, the patch is applied with `json_patch` (RFC 6902, as the API
//! server does) and the result must be a pod the API server would accept:
//! it deserializes as a `Pod`, container names are unique across init and
//! app containers, volume names are unique and every volume mount names a
//! volume, the gate (and the lease sidecar right after it) sits where the
//! configuration says, the app containers are untouched, the readiness gate
//! and the status annotation are there once, and a second review of the
//! patched pod adds nothing (idempotence).
//!
//! The webhook's configuration is one of three, chosen by the input's length
//! so that every input has one answer: the default (gate first, lease
//! sidecar), gate last, and no sidecar.
//!
//! The check itself is `counterweight_fuzz_props::admission_pod::check`, which the
//! normal suite also runs on every file of `fuzz/corpus/admission_pod/`.

#![no_main]

use counterweight_fuzz::timed;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| timed("admission_pod", data, counterweight_fuzz_props::admission_pod::check));
