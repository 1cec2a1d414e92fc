//! The bearer-token file format shared by ferryd (which checks tokens) and `ferry token new`
//! (which makes them): one token per line, `<name> sha256:<hex digest of the token>`.

use sha2::{Digest, Sha256};

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
