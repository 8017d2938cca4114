//! The OpenAPI pieces both services' documents use: the `bearer` security
//! scheme their routes name, the error answers any route may give, and the
//! schema of a streamed file.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify};
use vtp_core::api::ErrorBody;

/// Declares the `bearer` scheme the routes' `security` names.
#[derive(Debug)]
pub struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token made with `vtp-backend token create`; needed when the \
                         backend runs with `VTP_AUTH=tokens`",
                    ))
                    .build(),
            ),
        );
    }
}

/// Bytes of a file, streamed (`application/octet-stream`).
#[derive(Debug, utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct Binary(pub Vec<u8>);

/// The failures any authenticated route may answer with, beside its own.
#[derive(Debug, IntoResponses)]
pub enum CommonErrors {
    /// Malformed JSON or request.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No valid token (with `VTP_AUTH=tokens`).
    #[response(status = 401)]
    Unauthenticated(ErrorBody),
    /// Another user's object.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// No such object (or not the caller's).
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// The body is larger than the route takes.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// The body is not of the media type the route takes.
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// A field is wrong; `error.field` names it.
    #[response(status = 422)]
    Invalid(ErrorBody),
    /// Too many requests; `Retry-After` says when to try again.
    #[response(status = 429)]
    RateLimited(ErrorBody),
    /// A dependency (the database, the blob store, a trainer) is down;
    /// retry after `Retry-After`.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}
