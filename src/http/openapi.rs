//! The OpenAPI document (`GET /openapi.json`). Each handler describes its
//! own operation (`#[utoipa::path]`) and each module registers its handlers
//! with `utoipa_axum::routes!`, which adds the route and its description
//! together: a route cannot be served undocumented, nor documented unserved.
//! What operations share is added here, once: on every authenticated one
//! the bearer token, the audit headers and the refusals; on every one the
//! connection's own refusals (431, 503), `security` (`[]` on the open ones),
//! and the headers of the answers (`X-Request-Id`, `Cache-Control`,
//! `Retry-After` on every 429 and 503).
//!
//! `tests/integration/openapi.rs` holds the document to Redocly's linter
//! (`redocly.yaml` at the root says which of its rules are off, and why)
//! and generates a Python client from it that it then drives.

use utoipa::openapi::header::{Header, HeaderBuilder};
use utoipa::openapi::path::{Operation, Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{Content, ObjectBuilder, Ref, RefOr, Required, Schema, Type};
use utoipa::{Modify, OpenApi};

use super::problem::{PROBLEM_KINDS, Problem};
use super::trail::{AUDIT_HEADERS, MAX_HEADER_CHARS};

/// The name of the security scheme: `Authorization: Bearer <token>`.
pub const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "eventvault",
        description = "A GDPR-aware, encrypted event store. Every personal field is encrypted \
            under a key of its data subject; reads decrypt, redact or erase according to the \
            caller's role; a forget destroys the subject's keys. Every request to an \
            authenticated operation is written to a tamper-evident audit log.\n\n\
            Send amounts as JSON strings (`\"amount\":\"125.50\"`): the store keeps a number \
            digit for digit, but most generated clients read a JSON number as a float. \
            Errors are `application/problem+json` (RFC 9457); the `Problem` schema lists \
            every kind. A method that a path is not served with is a 405 \
            (`method-not-allowed`) with `Allow`. The subscriptions are Server-Sent Events \
            and need an SSE client.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    servers((url = "/", description = "The server that serves this document")),
    components(schemas(Problem)),
    modifiers(&Shared),
    tags(
        (name = "streams", description = "Append to and read streams"),
        (name = "log", description = "The global log, read and followed"),
        (name = "snapshots", description = "A stream's folded state"),
        (name = "subjects", description = "Data subjects: state, export, forget"),
        (name = "audit", description = "The audit log and its hash chain"),
        (name = "operations", description = "Health, readiness, metrics; no authentication"),
    )
)]
pub struct ApiDoc;

/// Adds the security scheme and the list of problem kinds.
struct Shared;

/// A problem response (`application/problem+json`).
pub fn problem(description: &str) -> Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/problem+json",
            Content::new(Some(Ref::from_schema_name("Problem"))),
        )
        .build()
}

/// A header of a response: its schema and what it says.
fn header(schema: ObjectBuilder, description: &str) -> Header {
    HeaderBuilder::new()
        .schema(schema)
        .description(Some(description))
        .build()
}

/// `Retry-After`, on every 429 and 503.
fn retry_after() -> Header {
    header(
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(1)),
        "Seconds to wait before retrying",
    )
}

/// The answers any authenticated operation may give besides its own.
fn refusals() -> Vec<(&'static str, Response)> {
    let mut unauthorized =
        problem("No token, a malformed Authorization header, or an unknown token");
    unauthorized.headers.insert(
        "WWW-Authenticate".into(),
        header(ObjectBuilder::new().schema_type(Type::String), "`Bearer`"),
    );
    vec![
        (
            "400",
            problem("Malformed input (path, query, headers or body), with what is wrong"),
        ),
        ("401", unauthorized),
        (
            "403",
            problem("The caller's roles do not grant this operation on this resource"),
        ),
        (
            "429",
            problem(
                "The principal's request rate is exceeded, or, without a valid token, the \
                 client address's (`rate-limited`)",
            ),
        ),
        (
            "500",
            problem(
                "An internal error, a failed integrity check (`integrity-failure`), or a data key \
                 the event store refers to missing from the keystore for a subject that was not \
                 forgotten (`key-missing`); nothing was disclosed",
            ),
        ),
        (
            "503",
            problem(
                "The service is starting (`starting`: the forget ledger is being re-applied) \
                 or stopping, a store does not answer within `--store-timeout-secs`, is full \
                 or busy, or the request could not be audited or committed (`unavailable`), \
                 or the connection limit is reached (`too-many-connections`)",
            ),
        ),
    ]
}

/// The answers of the connection itself, before any route: they may come
/// to any request.
fn connection_refusals() -> Vec<(&'static str, Response)> {
    vec![
        (
            "431",
            problem(
                "The request line and headers are over the limit (`headers-too-large`, \
                 `--max-header-bytes`); the connection closes",
            ),
        ),
        (
            "503",
            problem(
                "The connection limit is reached (`too-many-connections`, \
                 `--max-connections`); the connection closes",
            ),
        ),
    ]
}

/// The audit headers every authenticated operation reads.
fn audit_headers() -> Vec<Parameter> {
    AUDIT_HEADERS
        .iter()
        .map(|(name, description)| {
            ParameterBuilder::new()
                .name(*name)
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some(*description))
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .min_length(Some(1))
                        .max_length(Some(MAX_HEADER_CHARS))
                        .pattern(Some("^[\\x20-\\x7e]+$")),
                ))
                .build()
        })
        .collect()
}

/// The headers every answer of the router carries (`X-Request-Id`,
/// `Cache-Control`), and `Retry-After` on every 429 and 503.
fn add_response_headers(status: &str, response: &mut Response) {
    let headers = &mut response.headers;
    headers.entry("Cache-Control".into()).or_insert_with(|| {
        header(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["no-store"])),
            "Always `no-store`: no answer may be kept by a cache (a decrypted copy must not \
             outlive a forget)",
        )
    });
    // A 431 is the connection's answer, before a request id is assigned;
    // so is the 503 of `too-many-connections`.
    if status != "431" {
        headers.entry("X-Request-Id".into()).or_insert_with(|| {
            header(
                ObjectBuilder::new().schema_type(Type::String),
                "The request's `X-Request-Id`, or the one assigned to it (in the audit record \
                 and the logs); absent from the connection's own answers",
            )
        });
    }
    if status == "429" || status == "503" {
        headers
            .entry("Retry-After".into())
            .or_insert_with(retry_after);
    }
}

/// Gives a `text/event-stream` answer, whose schema is the whole body (a
/// string), the schema of each of its events. OpenAPI 3.2 has `itemSchema`
/// for that; in this 3.1 document (3.1 is what client generators read) it is
/// the extension `x-itemSchema`, which the API fuzz test hands to
/// schemathesis as `itemSchema` (`tests/schemathesis/eventvault_checks.py`).
fn describe_events(response: &mut Response) {
    if let Some(content) = response.content.get_mut("text/event-stream") {
        content
            .extensions
            .get_or_insert_with(Default::default)
            .insert("x-itemSchema".into(), super::subscribe::item_schema());
    }
}

fn add_shared(op: &mut Operation) {
    let authenticated = op.security.as_ref().is_some_and(|s| !s.is_empty());
    let mut shared = connection_refusals();
    if authenticated {
        // The operation's own refusals come first, so that its 503 (say,
        // too many subscriptions) keeps its description.
        shared.splice(0..0, refusals());
        if op.request_body.is_some() {
            shared.extend([
                (
                    "408",
                    problem(
                        "The body did not arrive in time (`request-timeout`); the connection \
                         closes",
                    ),
                ),
                (
                    "413",
                    problem("The body is over the limit (`payload-too-large`, `--max-body-bytes`)"),
                ),
            ]);
        }
        op.parameters
            .get_or_insert_with(Vec::new)
            .extend(audit_headers());
    } else {
        // Open to anyone: say so, rather than leave it to a default.
        op.security = Some(Vec::new());
    }
    for (status, response) in shared {
        op.responses
            .responses
            .entry(status.to_owned())
            .or_insert(RefOr::T(response));
    }
    for (status, response) in op.responses.responses.iter_mut() {
        if let RefOr::T(response) = response {
            add_response_headers(status, response);
            describe_events(response);
        }
    }
}

impl Modify for Shared {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        // The problem kinds, listed where a client looks for them.
        if let Some(RefOr::T(Schema::Object(problem))) = components.schemas.get_mut("Problem")
            && let Some(RefOr::T(Schema::Object(kind))) = problem.properties.get_mut("type")
        {
            let list: Vec<String> = PROBLEM_KINDS
                .iter()
                .map(|(kind, meaning)| format!("- `{kind}`: {meaning}"))
                .collect();
            kind.description = Some(format!(
                "`urn:eventvault:problem:<kind>`, one of:\n\n{}",
                list.join("\n")
            ));
        }
    }
}

/// The whole document, for the routes registered so far; called once, when
/// the router is built.
pub fn finish(mut api: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    for item in api.paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            add_shared(op);
        }
    }
    api
}

/// The stream of a write: 1–200 of `[A-Za-z0-9._:@-]`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct StreamPath {
    /// The stream id.
    #[param(pattern = "^[A-Za-z0-9._:@-]{1,200}$", example = "accounts-ACC-1")]
    pub stream: String,
}

/// The stream of a read: a stream id, or a system stream (`$subjects`).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ReadStreamPath {
    /// The stream id; `$subjects` is the ledger of forgets.
    #[param(
        pattern = "^([A-Za-z0-9._:@-]{1,200}|\\$[A-Za-z0-9._:-]{1,200})$",
        example = "accounts-ACC-1"
    )]
    pub stream: String,
}

/// A data subject: 1–200 of `[A-Za-z0-9._:@-]`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct SubjectPath {
    /// The data subject.
    #[param(pattern = "^[A-Za-z0-9._:@-]{1,200}$", example = "customer-42")]
    pub subject: String,
}
