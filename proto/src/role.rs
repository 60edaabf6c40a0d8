//! The roles of the contract: a client certificate's Organization (`O=`)
//! grants one, and the agent's role table says what each may call.

use std::fmt;
use std::str::FromStr;

/// Roles in increasing order of power; each includes the ones before it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Reader,
    Operator,
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Reader, Role::Operator, Role::Admin];

    /// The Organization value that grants this role, e.g. `covet:reader`.
    pub fn as_org(self) -> &'static str {
        match self {
            Role::Reader => "covet:reader",
            Role::Operator => "covet:operator",
            Role::Admin => "covet:admin",
        }
    }

    /// The short name, e.g. `reader`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// The role an Organization value grants; only the exact `covet:*` forms count.
    pub fn from_org(org: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.as_org() == org)
    }
}

/// A role name that is none of `reader`, `operator`, `admin` (or their `covet:` forms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownRole(pub String);

impl fmt::Display for UnknownRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown role `{}`: expected reader, operator or admin",
            self.0
        )
    }
}

impl std::error::Error for UnknownRole {}

impl FromStr for Role {
    type Err = UnknownRole;

    /// Accepts `reader`, `operator`, `admin` and their `covet:` forms.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == s || role.as_org() == s)
            .ok_or_else(|| UnknownRole(s.to_owned()))
    }
}

/// The short name; messages that mean the certificate's value use [`Role::as_org`].
impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Role> for crate::v1::Role {
    fn from(role: Role) -> Self {
        match role {
            Role::Reader => crate::v1::Role::Reader,
            Role::Operator => crate::v1::Role::Operator,
            Role::Admin => crate::v1::Role::Admin,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_order_by_power() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
            assert_eq!(role.as_org().parse::<Role>(), Ok(role));
            assert_eq!(Role::from_org(role.as_org()), Some(role));
        }
        assert!(Role::Reader < Role::Operator && Role::Operator < Role::Admin);
        assert_eq!(Role::from_org("reader"), None);
        assert_eq!(Role::from_org("COVET:admin"), None);
        assert_eq!("root".parse::<Role>(), Err(UnknownRole("root".to_owned())));
    }
}
