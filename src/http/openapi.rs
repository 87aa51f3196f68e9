//! The OpenAPI document (`GET /openapi.json`). Each handler describes its
//! own operation (`#[utoipa::path]`) and each module registers its handlers
//! with `utoipa_axum::routes!`, which adds the route and its description
//! together: a route cannot be served undocumented, nor documented unserved.
//! What every authenticated operation shares (the bearer token, the audit
//! headers, the refusals) is added here, once.

use utoipa::openapi::path::{Operation, Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{Content, HeaderBuilder, ObjectBuilder, Ref, RefOr, Required, Type};
use utoipa::{Modify, OpenApi};

use super::problem::Problem;
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
            authenticated operation is written to a tamper-evident audit log.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
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

/// Adds what every authenticated operation shares.
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

/// The answers any authenticated operation may give besides its own.
fn refusals() -> Vec<(&'static str, Response)> {
    let integer_header = |description: &str| {
        HeaderBuilder::new()
            .schema(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(1)),
            )
            .description(Some(description))
            .build()
    };
    let mut unauthorized =
        problem("No token, a malformed Authorization header, or an unknown token");
    unauthorized.headers.insert(
        "WWW-Authenticate".into(),
        HeaderBuilder::new()
            .schema(ObjectBuilder::new().schema_type(Type::String))
            .description(Some("`Bearer`"))
            .build(),
    );
    let mut limited = problem("The principal's request rate is exceeded (`rate-limited`)");
    limited.headers.insert(
        "Retry-After".into(),
        integer_header("Seconds until a request will be accepted"),
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
        ("429", limited),
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
                "The service is starting (`starting`, with `Retry-After`: the forget ledger is \
                 being re-applied) or stopping, or the request could not be audited or committed",
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

fn add_shared(op: &mut Operation) {
    let authenticated = op.security.as_ref().is_some_and(|s| !s.is_empty());
    if !authenticated {
        return;
    }
    for (status, response) in refusals() {
        op.responses
            .responses
            .entry(status.to_owned())
            .or_insert(RefOr::T(response));
    }
    if op.request_body.is_some() {
        for (status, description) in [
            (
                "408",
                "The body did not arrive in time (`request-timeout`); the connection closes",
            ),
            (
                "413",
                "The body is over the limit (`payload-too-large`, `--max-body-bytes`)",
            ),
        ] {
            op.responses
                .responses
                .entry(status.to_owned())
                .or_insert(RefOr::T(problem(description)));
        }
    }
    let params = op.parameters.get_or_insert_with(Vec::new);
    params.extend(audit_headers());
}

impl Modify for Shared {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        api.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                BEARER,
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
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
