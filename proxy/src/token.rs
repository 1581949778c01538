//! IMDSv2 session tokens for pods: minted by iamlet, bound to the pod's IP and an expiry,
//! verifiable on any worker with no shared mutable state (HMAC-SHA256 with one key).

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Longest token lifetime IMDS allows (6 hours).
pub const MAX_TTL_SECS: u64 = 21_600;
const DOMAIN: &[u8] = b"iamlet-imds-token-v1";
const MAC_BYTES: usize = 20;
/// 16 hex digits of expiry + 40 hex digits of MAC.
pub const TOKEN_LEN: usize = 16 + 2 * MAC_BYTES;

/// The result of checking a presented token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenCheck {
    Valid,
    Expired,
    /// Malformed, forged, or minted for another IP.
    Invalid,
}

/// The signing key.
pub struct TokenKey {
    key: hmac::Key,
}

/// The token key could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum TokenKeyError {
    #[error("the system random source failed")]
    Random,
    #[error("cannot {what} --imds-token-key-file {}: {error}", path.display())]
    File {
        what: &'static str,
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("--imds-token-key-file {} holds {len} bytes; it needs at least 32 (delete it to have one generated)", path.display())]
    Short {
        path: std::path::PathBuf,
        len: usize,
    },
}

fn random_secret() -> Result<[u8; 32], TokenKeyError> {
    let mut secret = [0u8; 32];
    SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| TokenKeyError::Random)?;
    Ok(secret)
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    pub fn from_bytes(secret: &[u8]) -> Self {
        TokenKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// `--imds-token-key-file` if given, else a fresh random key.
    pub fn new(file: Option<&Path>) -> Result<Self, TokenKeyError> {
        match file {
            Some(path) => Self::from_file(path),
            None => Self::random(),
        }
    }

    /// A fresh random key (tokens die with the process).
    pub fn random() -> Result<Self, TokenKeyError> {
        Ok(Self::from_bytes(&random_secret()?))
    }

    /// Reads the key from `path`, creating it (32 random bytes, mode 0600) when missing.
    pub fn from_file(path: &Path) -> Result<Self, TokenKeyError> {
        let file_error = |what, error| TokenKeyError::File {
            what,
            path: path.to_owned(),
            error,
        };
        match std::fs::File::open(path) {
            Ok(mut f) => {
                let mut secret = Vec::new();
                f.read_to_end(&mut secret)
                    .map_err(|e| file_error("read", e))?;
                if secret.len() < 32 {
                    return Err(TokenKeyError::Short {
                        path: path.to_owned(),
                        len: secret.len(),
                    });
                }
                Ok(Self::from_bytes(&secret))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret = random_secret()?;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| file_error("create", e))?;
                f.write_all(&secret).map_err(|e| file_error("write", e))?;
                Ok(Self::from_bytes(&secret))
            }
            Err(e) => Err(file_error("open", e)),
        }
    }

    fn mac(&self, ip: IpAddr, expires: u64) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(DOMAIN);
        let v6 = match ip.to_canonical() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        ctx.update(&v6.octets());
        ctx.update(&expires.to_be_bytes());
        ctx.sign()
    }

    /// A token for `ip`, valid until `expires` (Unix seconds), as text.
    #[cfg(test)]
    pub fn mint(&self, ip: IpAddr, expires: u64) -> String {
        self.mint_bytes(ip, expires)
            .iter()
            .map(|&b| b as char)
            .collect()
    }

    /// [`TokenKey::mint`] on the stack (the request path): the expiry as 16 lowercase hex
    /// digits, then the truncated MAC's.
    pub fn mint_bytes(&self, ip: IpAddr, expires: u64) -> [u8; TOKEN_LEN] {
        let mut t = [0u8; TOKEN_LEN];
        let (when, mac) = t.split_at_mut(16);
        hex(&expires.to_be_bytes(), when);
        hex(&self.mac(ip, expires).as_ref()[..MAC_BYTES], mac);
        t
    }

    /// Checks a presented token for `ip` at `now` (Unix seconds), in constant time.
    pub fn verify(&self, token: &[u8], ip: IpAddr, now: u64) -> TokenCheck {
        let token = token.trim_ascii();
        if token.len() != TOKEN_LEN || !token.iter().all(u8::is_ascii_hexdigit) {
            return TokenCheck::Invalid;
        }
        let Some(expires) = std::str::from_utf8(&token[..16])
            .ok()
            .and_then(|h| u64::from_str_radix(h, 16).ok())
        else {
            return TokenCheck::Invalid;
        };
        let mut presented = [0u8; MAC_BYTES];
        for (i, out) in presented.iter_mut().enumerate() {
            let pair = &token[16 + 2 * i..18 + 2 * i];
            match std::str::from_utf8(pair)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(b) => *out = b,
                None => return TokenCheck::Invalid,
            }
        }
        let expected = self.mac(ip, expires);
        // Constant-time comparison of the truncated MAC.
        let diff = expected.as_ref()[..MAC_BYTES]
            .iter()
            .zip(presented.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return TokenCheck::Invalid;
        }
        if now >= expires {
            TokenCheck::Expired
        } else {
            TokenCheck::Valid
        }
    }
}

/// Writes `bytes` as lowercase hex digits into `out` (twice as long).
fn hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 15)];
    }
}

/// The expiry (Unix seconds) of a token minted at `now` (since the Unix epoch) for `ttl`
/// seconds. The token holds whole seconds: the expiry is rounded up, so that a token never
/// lives shorter than the TTL asked for (a TTL of 1 minted at x.999 s would else be over at
/// once). [`TokenKey::verify`] takes whole seconds, so a token lives between `ttl` and
/// `ttl + 1` seconds.
pub fn expiry(now: std::time::Duration, ttl: u64) -> u64 {
    now.as_secs() + ttl + u64::from(now.subsec_nanos() > 0)
}

/// Parses `X-aws-ec2-metadata-token-ttl-seconds` (1..=21600).
pub fn parse_ttl(value: &[u8]) -> Option<u64> {
    let v = std::str::from_utf8(value).ok()?.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) || v.len() > 6 {
        return None;
    }
    let n: u64 = v.parse().ok()?;
    (1..=MAX_TTL_SECS).contains(&n).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_token_is_the_expiry_and_mac_in_lowercase_hex() {
        let k = TokenKey::from_bytes(&[7; 32]);
        let expires = 0x0123_4567_89ab_cdef;
        let mut want = format!("{expires:016x}");
        for b in &k.mac(ip("10.0.0.1"), expires).as_ref()[..MAC_BYTES] {
            want.push_str(&format!("{b:02x}"));
        }
        assert_eq!(k.mint(ip("10.0.0.1"), expires), want);
        assert_eq!(&k.mint_bytes(ip("10.0.0.1"), expires)[..], want.as_bytes());
    }

    #[test]
    fn a_token_verifies_for_its_ip_until_it_expires() {
        let k = TokenKey::from_bytes(&[7; 32]);
        let t = k.mint(ip("10.0.0.1"), 1000);
        assert_eq!(t.len(), TOKEN_LEN);
        assert_eq!(
            k.verify(t.as_bytes(), ip("10.0.0.1"), 999),
            TokenCheck::Valid
        );
        assert_eq!(
            k.verify(t.as_bytes(), ip("::ffff:10.0.0.1"), 999),
            TokenCheck::Valid
        );
        assert_eq!(
            k.verify(t.as_bytes(), ip("10.0.0.1"), 1000),
            TokenCheck::Expired
        );
        assert_eq!(
            k.verify(t.as_bytes(), ip("10.0.0.2"), 999),
            TokenCheck::Invalid
        );
    }

    /// Whether a token minted at `minted` (seconds, fractional) for `ttl` is still good at
    /// `at`, both read from the same wall clock the way the handler reads it.
    fn good_at(minted: f64, ttl: u64, at: f64) -> bool {
        let k = TokenKey::from_bytes(&[7; 32]);
        let t = k.mint(
            ip("10.0.0.1"),
            expiry(std::time::Duration::from_secs_f64(minted), ttl),
        );
        k.verify(t.as_bytes(), ip("10.0.0.1"), at as u64) == TokenCheck::Valid
    }

    #[test]
    fn a_token_lives_at_least_its_ttl_and_less_than_one_second_more() {
        // Minted at the very end of a second: a 1-second token is good at once and a second
        // later, and over two seconds after the start of that second.
        assert!(good_at(1000.999, 1, 1000.999));
        assert!(good_at(1000.999, 1, 1001.999));
        assert!(!good_at(1000.999, 1, 1002.0));
        // Minted on a whole second: exactly the TTL.
        assert!(good_at(1000.0, 1, 1000.999));
        assert!(!good_at(1000.0, 1, 1001.0));
        // The longest TTL.
        assert!(good_at(1000.5, MAX_TTL_SECS, 1000.5 + MAX_TTL_SECS as f64));
        assert!(!good_at(1000.5, MAX_TTL_SECS, 1001.0 + MAX_TTL_SECS as f64));
    }

    #[test]
    fn forged_or_foreign_tokens_are_invalid() {
        let k = TokenKey::from_bytes(&[7; 32]);
        let other = TokenKey::from_bytes(&[8; 32]);
        let t = other.mint(ip("10.0.0.1"), 1000);
        assert_eq!(
            k.verify(t.as_bytes(), ip("10.0.0.1"), 1),
            TokenCheck::Invalid
        );
        let mut extended = k.mint(ip("10.0.0.1"), 1000).into_bytes();
        extended[15] = b'f'; // push the expiry out without re-signing
        assert_eq!(k.verify(&extended, ip("10.0.0.1"), 1), TokenCheck::Invalid);
        for junk in [&b""[..], b"abc", &[b'z'; TOKEN_LEN][..]] {
            assert_eq!(k.verify(junk, ip("10.0.0.1"), 1), TokenCheck::Invalid);
        }
    }

    #[test]
    fn key_file_is_created_once_and_reused() {
        let dir = std::env::temp_dir().join(format!("iamlet-token-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let a = TokenKey::from_file(&dir).unwrap();
        let b = TokenKey::from_file(&dir).unwrap();
        let t = a.mint(ip("10.0.0.1"), 50);
        assert_eq!(b.verify(t.as_bytes(), ip("10.0.0.1"), 1), TokenCheck::Valid);
        std::fs::write(&dir, b"short").unwrap();
        assert!(
            TokenKey::from_file(&dir)
                .unwrap_err()
                .to_string()
                .contains("at least 32")
        );
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn ttl_bounds() {
        assert_eq!(parse_ttl(b"1"), Some(1));
        assert_eq!(parse_ttl(b"21600"), Some(21600));
        for bad in [
            &b"0"[..],
            b"21601",
            b"",
            b"-1",
            b"1.5",
            b"abc",
            b"99999999999999999999",
        ] {
            assert_eq!(parse_ttl(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
