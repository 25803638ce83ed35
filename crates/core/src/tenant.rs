//! The tenant of a call, as the gateway verified it, carried to the backends.
//!
//! The gateway authenticates the caller (API key or JWT), and sets [`TENANT_HEADER`] on every
//! call it makes to a backend; it builds each backend request afresh, so a copy a client sent
//! never passes through. A backend that keeps per-user state (the recommender) keys it by
//! tenant. A call that reaches a backend without the header (a direct call, a probe) is the
//! tenant [`DEFAULT_TENANT`].
//!
//! Anyone who can reach a backend directly could send the header too. Where that matters, the
//! backend is given a token file and the gateway the same one (`backends.<name>.
//! tenant_token_file`): the gateway sends it in [`TOKEN_HEADER`] beside the tenant, and the
//! backend refuses a tenant header without the right token (`PERMISSION_DENIED`).

use tonic::metadata::{MetadataMap, MetadataValue};

use crate::error::ServeError;

/// The tenant the gateway authenticated.
pub const TENANT_HEADER: &str = "x-marquee-tenant";
/// The shared token that proves [`TENANT_HEADER`] was set by the gateway.
pub const TOKEN_HEADER: &str = "x-marquee-tenant-token";
/// The tenant of a call that carries no tenant header.
pub const DEFAULT_TENANT: &str = "default";
/// Longest tenant name accepted (gateway tenant names are config keys; a direct caller's
/// header is bounded before it is used).
pub const MAX_TENANT_BYTES: usize = 128;

/// Sets the tenant (and the token, when there is one) on a call to a backend.
pub fn forward(metadata: &mut MetadataMap, tenant: &str, token: Option<&str>) {
    // Tenant names are validated config keys; a value that is not a valid header is never
    // sent rather than sent mangled (the backend then sees the default tenant).
    if let Ok(v) = MetadataValue::try_from(tenant) {
        metadata.insert(TENANT_HEADER, v);
        if let Some(t) = token.and_then(|t| MetadataValue::try_from(t).ok()) {
            metadata.insert(TOKEN_HEADER, t);
        }
    }
}

/// The tenant of an incoming call. With `token` configured, a tenant header must come with it.
pub fn of_call(metadata: &MetadataMap, token: Option<&str>) -> Result<String, ServeError> {
    let Some(tenant) = metadata.get(TENANT_HEADER) else {
        return Ok(DEFAULT_TENANT.to_string());
    };
    if let Some(want) = token {
        let got = metadata
            .get(TOKEN_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !constant_time_eq(got, want.as_bytes()) {
            return Err(ServeError::PermissionDenied(format!(
                "`{TENANT_HEADER}` is accepted only from the gateway (with `{TOKEN_HEADER}`)"
            )));
        }
    }
    let tenant = tenant.to_str().ok().filter(|t| {
        !t.is_empty() && t.len() <= MAX_TENANT_BYTES && t.bytes().all(|b| b.is_ascii_graphic())
    });
    tenant.map(str::to_owned).ok_or_else(|| {
        ServeError::invalid(
            TENANT_HEADER,
            format!("`{TENANT_HEADER}` must be 1..={MAX_TENANT_BYTES} visible ASCII characters"),
        )
    })
}

/// Smallest accepted token: 128 bits of hex or base64 is 22+ characters.
pub const MIN_TOKEN_BYTES: usize = 16;

/// Reads a tenant token file (a mounted secret): its content without trailing whitespace, at
/// least [`MIN_TOKEN_BYTES`] visible ASCII characters (it travels as a header).
pub fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("`{}`: {e}", path.display()))?;
    let token = text.trim_end();
    if token.len() < MIN_TOKEN_BYTES || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "`{}` must hold a token of at least {MIN_TOKEN_BYTES} visible ASCII characters",
            path.display()
        ));
    }
    Ok(token.to_string())
}

/// Compares without an early exit, so the time taken does not tell how much of a guess was
/// right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_header_is_the_default_tenant_and_a_forwarded_one_is_read_back() {
        let empty = MetadataMap::new();
        assert_eq!(of_call(&empty, None).unwrap(), DEFAULT_TENANT);
        assert_eq!(of_call(&empty, Some("t0k3n")).unwrap(), DEFAULT_TENANT);
        let mut m = MetadataMap::new();
        forward(&mut m, "acme", Some("t0k3n"));
        assert_eq!(of_call(&m, Some("t0k3n")).unwrap(), "acme");
        assert_eq!(of_call(&m, None).unwrap(), "acme");
    }

    #[test]
    fn a_tenant_without_the_token_is_refused_where_a_token_is_configured() {
        let mut forged = MetadataMap::new();
        forward(&mut forged, "acme", None);
        let e = of_call(&forged, Some("t0k3n")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        forward(&mut forged, "acme", Some("wrong"));
        assert!(of_call(&forged, Some("t0k3n")).is_err());
        let mut long = MetadataMap::new();
        forward(&mut long, &"x".repeat(MAX_TENANT_BYTES + 1), None);
        assert_eq!(
            of_call(&long, None).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
