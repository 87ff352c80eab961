//! AdmissionReview handling, without HTTP or TLS.
//!
//! This module turns request bytes into response bytes for both endpoints:
//! the mutating pod endpoint (which asks [`counterweight_core::inject`] for a
//! patch) and the validating policy endpoint (which asks
//! [`counterweight_core::policy::Policy::from_yaml`]). It owns the rules of
//! the wire protocol: a body that is not an `admission.k8s.io/v1`
//! AdmissionReview is an HTTP 400; a review it cannot act on (wrong kind,
//! unreadable object, no namespace) is *allowed unchanged* with a warning and
//! a log line, because a broken webhook must never break the cluster. Every
//! answer echoes the request uid. Nothing here panics on any input; the fuzz
//! test in `tests/` drives arbitrary bytes through [`Handler::handle`].
//!
//! ## Why its own wire types
//!
//! The body is read once, from bytes, into `ReviewIn`: the fields the
//! webhook acts on are read (mostly borrowed from the body), the ones it
//! only requires are checked without being built, and the object is read as
//! what the endpoint needs in the same pass: a pod through
//! [`counterweight_core::inject::PodView`] (only the fields the injection
//! rules look at), or raw JSON that becomes a `ConfigMap`. kube-core's
//! `AdmissionReview<DynamicObject>` buffers the whole body twice (two
//! `#[serde(flatten)]`s) and needs a `serde_json::Value` round trip to
//! become a `Pod`; with the patch built per request, that was most of the
//! handler's time. The patch comes pre-serialized from
//! [`counterweight_core::inject::Injector`], and the answer is written once,
//! into one buffer.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Instant;

use counterweight_core::inject::{Choice, Injector, InjectorConfig, PatchPlan, PodView};
use counterweight_core::names::{INJECT_ENABLED, INJECT_LABEL, POLICY_CONFIGMAP};
use counterweight_core::policy::Policy;
use k8s_openapi::api::core::v1::ConfigMap;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

use crate::metrics::{Endpoint, Metrics, Outcome};

/// The only AdmissionReview version the webhook speaks (the configurations
/// ask for `admissionReviewVersions: ["v1"]`).
pub const REVIEW_API_VERSION: &str = "admission.k8s.io/v1";

/// Labels of a namespace that opted in, shared by every request under
/// [`NamespaceLabels::TrustSelector`] instead of being built for each.
static OPTED_IN: LazyLock<BTreeMap<String, String>> =
    LazyLock::new(|| BTreeMap::from([(INJECT_LABEL.to_owned(), INJECT_ENABLED.to_owned())]));

/// Where the labels of a pod's namespace come from.
///
/// AdmissionReviews do not carry namespace labels. The webhook
/// configuration's `namespaceSelector` (`counterweight.dev/inject=enabled`)
/// makes the API server call the webhook only for opted-in namespaces, so the
/// default source, [`NamespaceLabels::TrustSelector`], reports every namespace
/// it is asked about as enabled. The core still applies every other rule
/// (system namespaces, opt-out, roles, idempotence).
#[derive(Debug, Clone, Default)]
pub enum NamespaceLabels {
    /// Trust the API server's namespaceSelector (see above).
    #[default]
    TrustSelector,
    /// A fixed map of namespace to labels; namespaces not in it have none.
    /// For tests, and for setups without a namespaceSelector.
    Fixed(BTreeMap<String, BTreeMap<String, String>>),
}

impl NamespaceLabels {
    fn labels(&self, namespace: &str) -> Cow<'_, BTreeMap<String, String>> {
        match self {
            NamespaceLabels::TrustSelector => Cow::Borrowed(&OPTED_IN),
            NamespaceLabels::Fixed(map) => map
                .get(namespace)
                .map_or_else(|| Cow::Owned(BTreeMap::new()), Cow::Borrowed),
        }
    }
}

/// An HTTP answer: status code and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status: 200 for every AdmissionReview answer, 400 for a body that
    /// is not one, 500 only if a response could not be serialized.
    pub status: u16,
    /// The body: an AdmissionReview for 200, a plain message otherwise.
    pub body: Vec<u8>,
    /// How the request ended, for metrics and tests.
    pub outcome: Outcome,
}

impl Reply {
    fn bad_request(message: String) -> Self {
        Self {
            status: 400,
            body: message.into_bytes(),
            outcome: Outcome::BadRequest,
        }
    }
}

/// Answers AdmissionReviews. Cheap to share behind an `Arc`.
#[derive(Debug, Clone)]
pub struct Handler {
    /// How the gate is built (the configuration and its pre-serialized patch parts).
    pub injector: Injector,
    /// Where namespace labels come from.
    pub namespaces: NamespaceLabels,
    /// Where outcomes are counted.
    pub metrics: Metrics,
}

/// An incoming AdmissionReview, as far as the webhook reads it.
///
/// Required fields are those `admission.k8s.io/v1` and kube-core require;
/// the ones the webhook does not use are checked for presence only
/// ([`IgnoredAny`] skips their value without building it). Direct `Cow`
/// fields borrow from the body unless they hold escapes; the optional ones
/// are copied (serde borrows only direct `Cow` fields).
///
/// `O` is what the object is read as: a [`PodView`] for the pod endpoint, so
/// the pod is read in the same pass as the review, or raw JSON.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", bound(deserialize = "O: Deserialize<'de>"))]
struct ReviewIn<'a, O> {
    #[serde(borrow)]
    api_version: Cow<'a, str>,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    request: Option<RequestIn<'a, O>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", bound(deserialize = "O: Deserialize<'de>"))]
struct RequestIn<'a, O> {
    #[serde(borrow)]
    uid: Cow<'a, str>,
    #[serde(borrow)]
    kind: KindIn<'a>,
    // Required but never read: deserializing is the presence check.
    #[allow(dead_code)]
    resource: IgnoredAny,
    #[serde(default, borrow)]
    sub_resource: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    name: Cow<'a, str>,
    #[serde(default, borrow)]
    namespace: Option<Cow<'a, str>>,
    operation: Operation,
    #[allow(dead_code)]
    user_info: IgnoredAny,
    #[serde(default)]
    object: Option<O>,
}

impl<'a, O> RequestIn<'a, O> {
    fn map_object<P>(self, f: impl FnOnce(O) -> P) -> RequestIn<'a, P> {
        RequestIn {
            uid: self.uid,
            kind: self.kind,
            resource: self.resource,
            sub_resource: self.sub_resource,
            name: self.name,
            namespace: self.namespace,
            operation: self.operation,
            user_info: self.user_info,
            object: self.object.map(f),
        }
    }
}

/// A pod review's object: the pod, or why it could not be read.
type PodObject<'a> = Result<PodView<'a>, serde_json::Error>;

/// Reads `body` as an AdmissionReview whose object is read as `O`, or the
/// 400 answer if it is not one.
fn read_review<'a, O: Deserialize<'a>>(body: &'a [u8]) -> Result<RequestIn<'a, O>, Reply> {
    let review: ReviewIn<'a, O> = serde_json::from_slice(body).map_err(|e| {
        tracing::warn!(error = %e, "request body is not an AdmissionReview");
        Reply::bad_request(format!("request body is not an AdmissionReview: {e}"))
    })?;
    checked(review)
}

/// The request of a review that is an `admission.k8s.io/v1` AdmissionReview
/// with a request, or the 400 answer.
fn checked<O>(review: ReviewIn<'_, O>) -> Result<RequestIn<'_, O>, Reply> {
    if review.kind != "AdmissionReview" || review.api_version != REVIEW_API_VERSION {
        return Err(Reply::bad_request(format!(
            "expected kind AdmissionReview, apiVersion {REVIEW_API_VERSION}; got kind {:?}, apiVersion {:?}",
            review.kind, review.api_version
        )));
    }
    review
        .request
        .ok_or_else(|| Reply::bad_request("AdmissionReview has no request".into()))
}

/// Reads a pod review in one pass over the body, the pod included. Only if
/// that fails is the body read again with the object kept raw, to tell a
/// body that is no AdmissionReview (400) from a review whose pod is
/// unreadable (allowed with a warning): the answers are those of always
/// reading in two steps, without scanning the object twice when it is fine.
fn read_pod_review(body: &[u8]) -> Result<RequestIn<'_, PodObject<'_>>, Reply> {
    // Validating the UTF-8 once, up front, is faster than serde_json's
    // check of every borrowed string, which a pod is mostly made of.
    if let Ok(text) = std::str::from_utf8(body)
        && let Ok(review) = serde_json::from_str::<ReviewIn<'_, PodView<'_>>>(text)
    {
        return checked(review).map(|r| r.map_object(Ok));
    }
    let request: RequestIn<'_, &RawValue> = read_review(body)?;
    Ok(request.map_object(|raw| serde_json::from_str(raw.get())))
}

#[derive(Deserialize)]
struct KindIn<'a> {
    // Required but never read, like `RequestIn::resource`.
    #[allow(dead_code)]
    group: IgnoredAny,
    #[allow(dead_code)]
    version: IgnoredAny,
    #[serde(borrow)]
    kind: Cow<'a, str>,
}

/// The admission operations of `admission.k8s.io/v1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum Operation {
    Create,
    Update,
    Delete,
    Connect,
}

/// The `response` of an AdmissionReview answer.
#[derive(Debug)]
struct Answer<'a> {
    uid: &'a str,
    allowed: bool,
    /// The message of a denial: an allowed answer carries no status.
    denial: Option<String>,
    /// The patch, written base64-encoded by the handler's injector.
    patch: Option<PatchPlan>,
    warnings: Vec<String>,
}

/// The `status` of a denial: a `metav1.Status` with only the message, as
/// kube-core's `AdmissionResponse::deny` writes it.
#[derive(serde::Serialize)]
struct Denial<'a> {
    message: &'a str,
}

impl<'a> Answer<'a> {
    fn allow(uid: &'a str) -> Self {
        Self {
            uid,
            allowed: true,
            denial: None,
            patch: None,
            warnings: Vec::new(),
        }
    }

    fn deny(self, message: String) -> Self {
        Self {
            allowed: false,
            denial: Some(message),
            ..self
        }
    }

    fn with_patch(self, plan: PatchPlan) -> Self {
        Self {
            patch: Some(plan),
            ..self
        }
    }

    /// The whole AdmissionReview answer as JSON, in one buffer.
    ///
    /// Written field by field rather than through a `Serialize` struct so the
    /// patch's base64, which the injector encoded in advance, is copied
    /// straight into the output: serde would need it as a `String` first and
    /// then scan all of it for characters to escape, of which the base64
    /// alphabet has none. Every string that comes from the request or from
    /// messages goes through `serde_json`. The patch is base64, Go's `[]byte`
    /// convention that the API server documents (kube-core's own
    /// serialization writes an array of numbers, several times the size).
    fn to_json(&self, injector: &Injector) -> Result<Vec<u8>, serde_json::Error> {
        let patch_len = self.patch.as_ref().map_or(0, |p| injector.base64_len(p));
        let mut out = Vec::with_capacity(192 + patch_len);
        out.extend_from_slice(br#"{"apiVersion":""#);
        out.extend_from_slice(REVIEW_API_VERSION.as_bytes());
        out.extend_from_slice(br#"","kind":"AdmissionReview","response":{"uid":"#);
        serde_json::to_writer(&mut out, self.uid)?;
        out.extend_from_slice(if self.allowed {
            br#","allowed":true"#.as_slice()
        } else {
            br#","allowed":false"#.as_slice()
        });
        if let Some(message) = &self.denial {
            out.extend_from_slice(br#","status":"#);
            serde_json::to_writer(&mut out, &Denial { message })?;
        }
        if let Some(plan) = &self.patch {
            out.extend_from_slice(br#","patchType":"JSONPatch","patch":""#);
            injector.write_base64(plan, &mut out);
            out.push(b'"');
        }
        if !self.warnings.is_empty() {
            out.extend_from_slice(br#","warnings":"#);
            serde_json::to_writer(&mut out, &self.warnings)?;
        }
        out.extend_from_slice(b"}}");
        Ok(out)
    }
}

/// A review we understood well enough to answer, or why not.
enum Verdict<'a> {
    Answered(Answer<'a>),
    /// Allowed unchanged with this warning.
    Unhandled(Answer<'a>, String),
}

impl Handler {
    /// Creates a handler with fresh metrics.
    pub fn new(injector: InjectorConfig, namespaces: NamespaceLabels) -> Self {
        Self {
            injector: Injector::new(injector),
            namespaces,
            metrics: Metrics::new(),
        }
    }

    /// Handles one request body for `endpoint`, counting it in the metrics.
    pub fn handle(&self, endpoint: Endpoint, body: &[u8]) -> Reply {
        let started = Instant::now();
        let reply = self.handle_inner(endpoint, body);
        self.metrics
            .request(endpoint, reply.outcome, started.elapsed().as_secs_f64());
        reply
    }

    fn handle_inner(&self, endpoint: Endpoint, body: &[u8]) -> Reply {
        match endpoint {
            Endpoint::Mutate => match read_pod_review(body) {
                Ok(request) => self.answer(endpoint, &request, |r, span| self.mutate(r, span)),
                Err(reply) => reply,
            },
            Endpoint::ValidatePolicy => match read_review::<&RawValue>(body) {
                Ok(request) => self.answer(endpoint, &request, |r, _| self.validate_policy(r)),
                Err(reply) => reply,
            },
        }
    }

    /// Decides `request` with `decide` inside the request's span and writes the answer.
    fn answer<'a, O>(
        &self,
        endpoint: Endpoint,
        request: &'a RequestIn<'a, O>,
        decide: impl FnOnce(&'a RequestIn<'a, O>, &tracing::Span) -> Verdict<'a>,
    ) -> Reply {
        // Fields are recorded as plain strings (no `Display` formatting); a
        // pod created from a generateName has no name yet, so `mutate`
        // records the generateName instead.
        let span = tracing::info_span!(
            "admission",
            endpoint = endpoint.as_str(),
            uid = &*request.uid,
            namespace = request.namespace.as_deref().unwrap_or(""),
            name = (!request.name.is_empty()).then_some(&*request.name),
            kind = &*request.kind.kind,
        );
        let _entered = span.enter();
        let verdict = decide(request, &span);
        let (answer, outcome) = match verdict {
            Verdict::Answered(a) => (a, Outcome::Answered),
            Verdict::Unhandled(mut a, warning) => {
                tracing::warn!(%warning, "allowing a review the webhook cannot handle");
                a.warnings = vec![format!("counterweight: {warning}")];
                (a, Outcome::Unhandled)
            }
        };
        match answer.to_json(&self.injector) {
            Ok(body) => Reply {
                status: 200,
                body,
                outcome,
            },
            Err(e) => {
                tracing::error!(error = %e, "could not serialize an AdmissionReview");
                Reply {
                    status: 500,
                    body: format!("could not serialize the response: {e}").into_bytes(),
                    outcome: Outcome::Unhandled,
                }
            }
        }
    }

    fn mutate<'a>(
        &self,
        request: &'a RequestIn<'a, PodObject<'a>>,
        span: &tracing::Span,
    ) -> Verdict<'a> {
        let allow = Answer::allow(&request.uid);
        if request.kind.kind != "Pod" || request.sub_resource.is_some() {
            let what = match request.sub_resource.as_deref() {
                Some(sub) => format!("{}/{sub}", request.kind.kind),
                None => request.kind.kind.clone().into_owned(),
            };
            return Verdict::Unhandled(
                allow,
                format!("the pod webhook was sent a {what}; check the webhook rules"),
            );
        }
        if request.operation != Operation::Create {
            return Verdict::Unhandled(
                allow,
                format!(
                    "the pod webhook only handles CREATE, was sent {:?}",
                    request.operation
                ),
            );
        }
        let pod = match &request.object {
            Some(Ok(pod)) => pod,
            Some(Err(e)) => {
                return Verdict::Unhandled(allow, format!("pod not injected: unreadable pod: {e}"));
            }
            None => {
                return Verdict::Unhandled(
                    allow,
                    "pod not injected: the review has no object".into(),
                );
            }
        };
        if request.name.is_empty()
            && let Some(name) = pod
                .metadata
                .name
                .as_deref()
                .or(pod.metadata.generate_name.as_deref())
        {
            span.record("name", name);
        }
        let namespace = match request
            .namespace
            .as_deref()
            .or(pod.metadata.namespace.as_deref())
        {
            Some(ns) if !ns.is_empty() => ns,
            _ => {
                return Verdict::Unhandled(
                    allow,
                    "pod not injected: the review names no namespace".into(),
                );
            }
        };
        let labels = self.namespaces.labels(namespace);
        match self.injector.decide(pod, &labels, namespace) {
            Choice::Inject(plan) => {
                self.metrics.injections.inc();
                // Debug, like the skips: a line per admitted pod at the
                // default level cost more than the rest of the handler (a
                // write per pod, measured with the `handler` bench), and the
                // injection is already on record in the pod's status
                // annotation, the injections counter and the API server's
                // audit log. Warnings and refusals stay at warn and info.
                tracing::debug!("injected the init-gate");
                Verdict::Answered(allow.with_patch(plan))
            }
            Choice::Skip(reason) => {
                self.metrics.skip(reason);
                tracing::debug!(reason = reason.as_str(), "not injecting");
                let mut a = allow;
                if reason.is_suspicious() {
                    a.warnings = vec![format!(
                        "counterweight: init-gate not injected ({reason}); check the pod's counterweight.dev/role label, and that no container or volume is named {}",
                        self.injector.config().reserved_names().join(", ")
                    )];
                }
                Verdict::Answered(a)
            }
        }
    }

    fn validate_policy<'a>(&self, request: &'a RequestIn<'a, &'a RawValue>) -> Verdict<'a> {
        let allow = Answer::allow(&request.uid);
        if request.kind.kind != "ConfigMap" {
            return Verdict::Unhandled(
                allow,
                format!(
                    "the policy webhook was sent a {}; check the webhook rules",
                    request.kind.kind
                ),
            );
        }
        // Deleting the policy is the controller's business (it keeps the last
        // good one); other ConfigMaps are not ours to judge.
        if request.operation == Operation::Delete || request.name != POLICY_CONFIGMAP {
            return Verdict::Answered(allow);
        }
        let cm: ConfigMap = match request.object.map(|o| serde_json::from_str(o.get())) {
            Some(Ok(cm)) => cm,
            Some(Err(e)) => {
                return Verdict::Unhandled(
                    allow,
                    format!("policy not checked: unreadable ConfigMap: {e}"),
                );
            }
            None => {
                return Verdict::Unhandled(
                    allow,
                    "policy not checked: the review has no object".into(),
                );
            }
        };
        match Policy::from_configmap_data(cm.data.as_ref()) {
            Ok(_) => Verdict::Answered(allow),
            Err(problems) => {
                self.metrics.policy_rejections.inc();
                tracing::info!(
                    problems = problems.problems().len(),
                    "refusing an invalid policy"
                );
                Verdict::Answered(allow.deny(problems.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use counterweight_core::names::POLICY_KEY;
    use serde_json::{Value, json};

    fn handler() -> Handler {
        Handler::new(
            InjectorConfig {
                cluster_name: "east".into(),
                ..Default::default()
            },
            NamespaceLabels::TrustSelector,
        )
    }

    fn review(
        kind: &str,
        resource: &str,
        op: &str,
        ns: &str,
        name: &str,
        object: Value,
    ) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "uid-123",
                "kind": {"group": "", "version": "v1", "kind": kind},
                "resource": {"group": "", "version": "v1", "resource": resource},
                "name": name,
                "namespace": ns,
                "operation": op,
                "userInfo": {"username": "test"},
                "object": object,
                "oldObject": null,
            }
        }))
        .unwrap()
    }

    fn pod() -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "web-"},
               "spec": {"containers": [{"name": "app", "image": "x"}]}})
    }

    fn response(reply: &Reply) -> Value {
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        let v: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(v["kind"], "AdmissionReview");
        v["response"].clone()
    }

    #[test]
    fn pod_create_gets_a_json_patch_and_uid_is_echoed() {
        let h = handler();
        let r = response(&h.handle(
            Endpoint::Mutate,
            &review("Pod", "pods", "CREATE", "shop", "", pod()),
        ));
        assert_eq!(r["uid"], "uid-123");
        assert_eq!(r["allowed"], true);
        assert_eq!(r["patchType"], "JSONPatch");
        assert!(r.get("warnings").is_none());
        use base64::Engine;
        let patch = base64::engine::general_purpose::STANDARD
            .decode(r["patch"].as_str().expect("patch is base64 text"))
            .unwrap();
        let ops: Value = serde_json::from_slice(&patch).unwrap();
        assert!(ops.to_string().contains("counterweight-gate"), "{ops}");
        assert_eq!(h.metrics.injections.get(), 1);
    }

    #[test]
    fn uids_needing_escapes_are_echoed_exactly() {
        let h = handler();
        for uid in [
            "a\"b",
            "back\\slash",
            "tab\there",
            "ünï\u{1F600}",
            "</script>",
        ] {
            let mut v: Value =
                serde_json::from_slice(&review("Pod", "pods", "CREATE", "shop", "", pod()))
                    .unwrap();
            v["request"]["uid"] = json!(uid);
            let r = response(&h.handle(Endpoint::Mutate, &serde_json::to_vec(&v).unwrap()));
            assert_eq!(r["uid"], uid);
            assert_eq!(r["patchType"], "JSONPatch");
        }
    }

    #[test]
    fn skips_are_allowed_without_patch_and_counted() {
        let h = handler();
        let mut p = pod();
        p["metadata"]["labels"] = json!({"counterweight.dev/role": "database"});
        let r = response(&h.handle(
            Endpoint::Mutate,
            &review("Pod", "pods", "CREATE", "shop", "", p),
        ));
        assert_eq!(r["allowed"], true);
        assert!(r.get("patch").is_none());
        let r = response(&h.handle(
            Endpoint::Mutate,
            &review("Pod", "pods", "CREATE", "kube-system", "", pod()),
        ));
        assert!(r.get("patch").is_none());
        let text = h.metrics.encode().unwrap();
        assert!(
            text.contains(r#"counterweight_webhook_skips_total{reason="sync-role"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"counterweight_webhook_skips_total{reason="system-namespace"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn unknown_role_warns() {
        let h = handler();
        let mut p = pod();
        p["metadata"]["labels"] = json!({"counterweight.dev/role": "servce"});
        let r = response(&h.handle(
            Endpoint::Mutate,
            &review("Pod", "pods", "CREATE", "shop", "", p),
        ));
        assert_eq!(r["allowed"], true);
        assert!(
            r["warnings"][0].as_str().unwrap().contains("unknown-role"),
            "{r}"
        );
    }

    #[test]
    fn garbage_is_400_with_a_message() {
        let h = handler();
        for body in [
            &b"not json"[..],
            b"{}",
            b"[]",
            b"{\"kind\":\"AdmissionReview\"}",
        ] {
            let reply = h.handle(Endpoint::Mutate, body);
            assert_eq!(reply.status, 400, "{}", String::from_utf8_lossy(body));
            assert!(!reply.body.is_empty());
        }
        let no_request = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#;
        let reply = h.handle(Endpoint::Mutate, no_request);
        assert_eq!(reply.status, 400);
        assert!(String::from_utf8_lossy(&reply.body).contains("no request"));
        let v1beta1 = String::from_utf8(review("Pod", "pods", "CREATE", "shop", "", pod()))
            .unwrap()
            .replace("admission.k8s.io/v1", "admission.k8s.io/v1beta1");
        assert_eq!(h.handle(Endpoint::Mutate, v1beta1.as_bytes()).status, 400);
    }

    #[test]
    fn unhandleable_reviews_are_allowed_with_a_warning() {
        let h = handler();
        let cases = [
            review(
                "Service",
                "services",
                "CREATE",
                "shop",
                "s",
                json!({"metadata": {}}),
            ),
            review("Pod", "pods", "UPDATE", "shop", "p", pod()),
            // Unreadable where the injection rules look (the pod is read
            // through `PodView`, which skips fields the rules never read,
            // such as `containers`: the API server decoded the object before
            // sending it and validates the patched result anyway).
            review(
                "Pod",
                "pods",
                "CREATE",
                "shop",
                "p",
                json!({"metadata": {}, "spec": {"containers": [], "initContainers": "nope"}}),
            ),
            review(
                "Pod",
                "pods",
                "CREATE",
                "shop",
                "p",
                json!({"metadata": {"labels": {"app": 7}}, "spec": {"containers": []}}),
            ),
            review(
                "Pod",
                "pods",
                "CREATE",
                "shop",
                "p",
                json!({"metadata": {}, "spec": {"volumes": [{"emptyDir": {}}]}}),
            ),
            review("Pod", "pods", "CREATE", "shop", "p", json!(5)),
            review("Pod", "pods", "CREATE", "shop", "p", Value::Null),
            review("Pod", "pods", "CREATE", "", "p", pod()),
        ];
        for body in cases {
            let reply = h.handle(Endpoint::Mutate, &body);
            assert_eq!(reply.outcome, Outcome::Unhandled);
            let r = response(&reply);
            assert_eq!(r["uid"], "uid-123");
            assert_eq!(r["allowed"], true);
            assert!(r.get("patch").is_none());
            assert!(
                r["warnings"][0]
                    .as_str()
                    .unwrap()
                    .starts_with("counterweight:"),
                "{r}"
            );
        }
    }

    fn policy_cm(text: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": POLICY_CONFIGMAP, "namespace": "counterweight-system"},
               "data": {POLICY_KEY: text}})
    }

    #[test]
    fn invalid_policy_is_denied_with_the_problems() {
        let h = handler();
        let body = review(
            "ConfigMap",
            "configmaps",
            "CREATE",
            "counterweight-system",
            POLICY_CONFIGMAP,
            policy_cm("threshold: 7\n"),
        );
        let r = response(&h.handle(Endpoint::ValidatePolicy, &body));
        assert_eq!(r["allowed"], false);
        let msg = r["status"]["message"].as_str().unwrap();
        assert!(msg.contains("threshold"), "{msg}");
        assert_eq!(h.metrics.policy_rejections.get(), 1);

        let no_key = json!({"metadata": {"name": POLICY_CONFIGMAP}, "data": {"other": "x"}});
        let body = review(
            "ConfigMap",
            "configmaps",
            "UPDATE",
            "counterweight-system",
            POLICY_CONFIGMAP,
            no_key,
        );
        let r = response(&h.handle(Endpoint::ValidatePolicy, &body));
        assert_eq!(r["allowed"], false);
        assert!(
            r["status"]["message"]
                .as_str()
                .unwrap()
                .contains(POLICY_KEY)
        );
    }

    /// Policy texts: valid ones, near misses, YAML that is not a policy,
    /// anchors and aliases, and arbitrary text.
    fn policy_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let valid = "interval: 1s\nthreshold: 0.5\nretries: 1\ncomponents:\n  - {name: web, namespaces: [shop], selector: {matchLabels: {app: web}}, weight: 1}\n";
        prop_oneof![
            Just(valid.to_owned()),
            (0.0f64..2.0, 0i64..4).prop_map(move |(t, r)| valid
                .replace("threshold: 0.5", &format!("threshold: {t}"))
                .replace("retries: 1", &format!("retries: {r}"))),
            "[a-z]{1,8}: [a-z0-9]{0,8}",
            "(interval|threshold|retries|components): [\\[\\]{}&*a-z0-9 ,:-]{0,24}",
            Just("a: &x [1, 2]\nb: *x\n".to_owned()),
            any::<String>(),
        ]
    }

    proptest::proptest! {
        /// Issue 17: the validating webhook and the controller (and cwctl)
        /// judge the same bytes the same way. The webhook's answer, through
        /// its whole request path, is "allowed" exactly when core's reader
        /// accepts the ConfigMap's data, and a refusal carries core's reason.
        #[test]
        fn the_webhook_allows_exactly_what_the_controller_accepts(
            text in policy_text(),
            under_key in proptest::bool::weighted(0.9),
        ) {
            let key = if under_key { POLICY_KEY } else { "other" };
            let data = std::collections::BTreeMap::from([(key.to_owned(), text)]);
            let cm = json!({"metadata": {"name": POLICY_CONFIGMAP}, "data": data});
            let body = review("ConfigMap", "configmaps", "CREATE", "counterweight-system", POLICY_CONFIGMAP, cm);
            let r = response(&handler().handle(Endpoint::ValidatePolicy, &body));
            let core = Policy::from_configmap_data(Some(&data));
            proptest::prop_assert_eq!(r["allowed"].as_bool(), Some(core.is_ok()), "{:?}", r);
            if let Err(problems) = core {
                let msg = r["status"]["message"].as_str().unwrap_or_default().to_owned();
                proptest::prop_assert!(msg.contains(&problems.to_string()), "{} vs {}", msg, problems);
            }
        }
    }

    #[test]
    fn other_configmaps_and_deletes_are_allowed() {
        let h = handler();
        let other = json!({"metadata": {"name": "x"}, "data": {POLICY_KEY: "garbage: ["}});
        let body = review(
            "ConfigMap",
            "configmaps",
            "CREATE",
            "counterweight-system",
            "x",
            other,
        );
        assert_eq!(
            response(&h.handle(Endpoint::ValidatePolicy, &body))["allowed"],
            true
        );
        let body = review(
            "ConfigMap",
            "configmaps",
            "DELETE",
            "counterweight-system",
            POLICY_CONFIGMAP,
            Value::Null,
        );
        assert_eq!(
            response(&h.handle(Endpoint::ValidatePolicy, &body))["allowed"],
            true
        );
    }
}
