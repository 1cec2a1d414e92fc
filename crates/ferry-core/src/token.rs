//! The bearer-token file format shared by the daemons (which check tokens, in `ferry_daemon::auth`)
//! and `ferry token new` (which makes them): one token per line, `<name> sha256:<hex digest of
//! the token>`; and the client side that presents a token on every gRPC call.

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// The digest stored for a token.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The token-file line for a named token.
pub fn token_line(name: &str, token: &str) -> String {
    format!("{name} sha256:{}", hex::encode(digest(token)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn line_holds_the_digest_not_the_token() {
        let l = super::token_line("app", "abc");
        assert_eq!(
            l,
            "app sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

/// The client side: adds `authorization: Bearer <token>` to every gRPC call when a token is set
/// (the `ferry` CLI to ferryd, ferryd to ferry-cloud).
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    /// A token to present, or none; `field` names the setting in the error for a token a header
    /// cannot carry.
    pub fn new(token: Option<&str>, field: &str) -> Result<Self> {
        match token {
            Some(t) => format!("Bearer {t}")
                .parse()
                .map(|v| Bearer(Some(v)))
                .map_err(|_| Error::invalid(field, "the token must be printable ASCII")),
            None => Ok(Bearer(None)),
        }
    }

    /// Whether a token is presented.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut req: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}
