//! The webhook's wire-speed encoding of the patch: every step serialized
//! once, as JSON and as base64 padded to whole 3-byte groups, so that a
//! pod's answer is a concatenation, not an encoding.

use super::*;

/// An injector with its patch pieces serialized in advance.
///
/// [`inject`] builds the gate container, volumes and readiness gate as
/// Kubernetes structs, converts them to JSON values and collects a
/// [`Patch`] on every call: several microseconds of allocation, for output
/// that depends only on the configuration and four facts about the pod. An
/// `Injector` serializes each of the patch's possible parts once, at
/// construction, and [`Injector::decide`] answers a [`PodView`] with the
/// [`PatchPlan`] its facts select. The rules are the same code as
/// [`inject`]'s; [`Injector::json`] writes the bytes of
/// `serde_json::to_vec` of [`inject`]'s patch.
///
/// ## The base64 form
///
/// An AdmissionReview carries the patch base64-encoded, and encoding 1.4 KB
/// for every pod was the largest single cost left in the webhook's handler.
/// Base64 maps every 3 input bytes to 4 output characters on their own, so
/// the encoding of a concatenation is the concatenation of the encodings
/// whenever each piece but the last is a multiple of 3 bytes long. Each part
/// is therefore stored with its separator (`[` first, `,` after) and padded
/// with JSON whitespace after its last value to a multiple of 3, and encoded
/// once; [`Injector::write_base64`] only copies. The decoded patch differs
/// from [`Injector::json`]'s only by that insignificant whitespace (RFC 8259
/// section 2), which a property test checks, and the API server's e2e tests
/// apply it.
#[derive(Debug, Clone)]
pub struct Injector {
    pub(super) config: InjectorConfig,
    /// `Step::ALL[i]`'s operations as JSON, comma-separated, without brackets.
    pub(super) fragments: [String; Step::COUNT],
    /// Base64 of `[` + `fragments[i]` + padding, for the first part.
    pub(super) first_base64: [String; Step::COUNT],
    /// Base64 of `,` + `fragments[i]` + padding, for every later part.
    pub(super) next_base64: [String; Step::COUNT],
}

/// Base64 of the `]` that closes every patch: the last piece, so it needs
/// no padding of its own.
pub(super) const CLOSE_BASE64: &str = "XQ==";
/// Base64 of `[]`, the patch of an empty plan.
pub(super) const EMPTY_BASE64: &str = "W10=";

/// The parts of one pod's patch, in order, as [`Injector::decide`] chose
/// them. Small and `Copy`: the bytes are written only by [`Injector::json`]
/// or [`Injector::write_base64`], straight into the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchPlan(pub(super) [Option<Step>; 4]);

impl PatchPlan {
    fn parts(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().flatten().map(|s| s.index())
    }
}

/// What [`Injector::decide`] answers: the patch to write, or why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// Apply the RFC 6902 patch of this plan to the pod.
    Inject(PatchPlan),
    /// Leave the pod as it is, for this reason.
    Skip(Skip),
}

impl Injector {
    /// Serializes every patch part `config` can produce, as JSON and as base64.
    pub fn new(config: InjectorConfig) -> Self {
        use base64::Engine;
        let fragments = Step::ALL.map(|step| {
            // A list of operations serializes as `[op,op]`; keep the inside
            // so steps join with commas. Serializing JSON values with string
            // keys cannot fail; `null`, like `to_value`'s fallback, would make
            // the API server reject the patch loudly, never apply a wrong one.
            let text = serde_json::to_string(&step.ops(&config)).unwrap_or_default();
            text.strip_prefix('[')
                .and_then(|t| t.strip_suffix(']'))
                .map_or_else(|| "null".to_owned(), str::to_owned)
        });
        let encoded = |separator: char| {
            std::array::from_fn(|i| {
                let mut piece = format!("{separator}{}", fragments[i]);
                while piece.len() % 3 != 0 {
                    piece.push(' ');
                }
                base64::engine::general_purpose::STANDARD.encode(piece)
            })
        };
        Self {
            first_base64: encoded('['),
            next_base64: encoded(','),
            config,
            fragments,
        }
    }

    /// The configuration the parts were built from.
    pub fn config(&self) -> &InjectorConfig {
        &self.config
    }

    /// The same decision as [`inject`] with this injector's configuration:
    /// which parts the patch is made of, or why the pod is skipped.
    pub fn decide(
        &self,
        pod: &PodView<'_>,
        namespace_labels: &BTreeMap<String, String>,
        namespace: &str,
    ) -> Choice {
        match skip_reason(pod, namespace_labels, namespace, &self.config) {
            Some(reason) => Choice::Skip(reason),
            None => Choice::Inject(PatchPlan(plan(pod, &self.config))),
        }
    }

    /// The patch of `plan` as compact JSON: the bytes of `serde_json::to_vec`
    /// of [`inject`]'s patch for the same pod.
    pub fn json(&self, plan: &PatchPlan) -> Vec<u8> {
        let len = plan
            .parts()
            .map(|i| self.fragments[i].len() + 1)
            .sum::<usize>()
            + 1;
        let mut out = Vec::with_capacity(len);
        for (n, i) in plan.parts().enumerate() {
            out.push(if n == 0 { b'[' } else { b',' });
            out.extend_from_slice(self.fragments[i].as_bytes());
        }
        if out.is_empty() {
            out.push(b'[');
        }
        out.push(b']');
        out
    }

    /// How many bytes [`Injector::write_base64`] appends for `plan`.
    pub fn base64_len(&self, plan: &PatchPlan) -> usize {
        self.base64_pieces(plan).map(str::len).sum()
    }

    /// Appends the base64 encoding of `plan`'s patch (standard alphabet,
    /// padded) to `out`: the JSON of [`Injector::json`] with whitespace
    /// between its parts, see the type's documentation.
    pub fn write_base64(&self, plan: &PatchPlan, out: &mut Vec<u8>) {
        out.reserve(self.base64_len(plan));
        for piece in self.base64_pieces(plan) {
            out.extend_from_slice(piece.as_bytes());
        }
    }

    fn base64_pieces<'a>(&'a self, plan: &'a PatchPlan) -> impl Iterator<Item = &'a str> + 'a {
        let parts = plan.parts().enumerate().map(|(n, i)| {
            if n == 0 {
                self.first_base64[i].as_str()
            } else {
                self.next_base64[i].as_str()
            }
        });
        // A plan always holds the marker and the gate; were it empty, the
        // patch would be `[]`, whose `[` has no padded piece to ride in.
        let close = if plan.parts().next().is_none() {
            EMPTY_BASE64
        } else {
            CLOSE_BASE64
        };
        parts.chain(std::iter::once(close))
    }
}
