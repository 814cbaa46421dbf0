//! What the limits are counted by: a client's address, a username, or the two together,
//! each as a fixed-size key.

use std::{fmt, net::IpAddr};

use sha2::{Digest, Sha256};

/// The address a rate is counted for. IPv6 clients are counted by their /64, since one
/// subscriber commonly holds a whole /64 and could otherwise rotate through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddress(IpAddr);

impl ClientAddress {
    pub fn new(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Self(IpAddr::V6(prefix.into()))
                }
            },
            v4 => Self(v4),
        }
    }

    /// The address of a request that came with none (in-process calls).
    pub fn unknown() -> Self {
        Self(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }
}

/// The address (an IPv6 client's /64 prefix), as the shared counters name it.
impl fmt::Display for ClientAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A fixed-size key: however long the username, an entry costs the same.
pub type Key = [u8; 16];

pub fn user_key(username_key: &str) -> Key {
    digest(&[b"user", username_key.as_bytes()])
}

pub fn pair_key(username_key: &str, address: ClientAddress) -> Key {
    digest(&[
        b"pair",
        username_key.as_bytes(),
        address.0.to_string().as_bytes(),
    ])
}

fn digest(parts: &[&[u8]]) -> Key {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    let mut key = [0; 16];
    key.copy_from_slice(&hasher.finalize()[..16]);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(text: &str) -> ClientAddress {
        ClientAddress::new(text.parse().unwrap())
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_slash_64() {
        assert_eq!(address("2001:db8::1"), address("2001:db8::ffff:1"));
        assert_ne!(address("2001:db8::1"), address("2001:db8:0:1::1"));
        assert_eq!(address("::ffff:10.0.0.1"), address("10.0.0.1"));
    }
}
