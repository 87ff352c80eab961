//! The operator command request: how `cwctl` asks a controller to switch
//! over, pause or resume, and how the controller answers.
//!
//! The request is a ConfigMap that `cwctl` files and the controller
//! validates, forwards to its state machine and answers in place. Both sides
//! use these names, so they cannot drift apart.

/// Name of the request ConfigMap in the controller namespace.
pub const COMMAND_CONFIGMAP: &str = "counterweight-command";
/// Request key: `switchover`, `pause` or `resume`.
pub const COMMAND_KEY: &str = "command";
/// Request key: the cluster a switchover should make active.
pub const TARGET_KEY: &str = "target";
/// Request key: the requester's identifier of this request.
pub const ID_KEY: &str = "id";
/// Request key: RFC 3339 time the request was filed.
pub const REQUESTED_AT_KEY: &str = "requestedAt";
/// Answer key: the `id` of the last request handled.
pub const HANDLED_ID_KEY: &str = "handledId";
/// Answer key: `accepted` or `rejected: <why>`.
pub const RESULT_KEY: &str = "result";
/// Answer key: RFC 3339 time the answer was written.
pub const HANDLED_AT_KEY: &str = "handledAt";
/// Value of [`RESULT_KEY`] for a request forwarded to the HA loop.
pub const ACCEPTED: &str = "accepted";
/// Prefix of [`RESULT_KEY`] for a refused request; the reason follows.
pub const REJECTED_PREFIX: &str = "rejected: ";
