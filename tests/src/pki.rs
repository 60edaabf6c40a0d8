//! A fresh PKI per test: CA, an agent certificate for loopback, a client per
//! role, and makers of bad certificates (no role, expired, foreign CA).

use std::path::{Path, PathBuf};
use std::time::Duration;

use covetctl::connect::Credentials;
use covetctl::pki::{self, Role};
use time::OffsetDateTime;

pub struct TestPki {
    pub dir: PathBuf,
}

impl TestPki {
    /// Creates `dir` with `ca.crt`, `agent.crt` (SANs 127.0.0.1, localhost)
    /// and clients `reader`, `operator`, `admin`.
    pub fn new(dir: &Path) -> TestPki {
        pki::init_ca(dir, &pki::CaOptions::default()).expect("init CA");
        pki::issue_agent(
            dir,
            "agent",
            &["127.0.0.1".to_owned(), "localhost".to_owned()],
            Duration::from_secs(86400),
        )
        .expect("issue agent cert");
        for (name, role) in [
            ("reader", Role::Reader),
            ("operator", Role::Operator),
            ("admin", Role::Admin),
        ] {
            pki::issue_client(dir, name, role, Duration::from_secs(86400)).expect("issue client");
        }
        TestPki {
            dir: dir.to_owned(),
        }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Credentials of a client issued earlier under `name`.
    pub fn client(&self, name: &str) -> Credentials {
        Credentials {
            ca: self.ca(),
            cert: self.dir.join(format!("{name}.crt")),
            key: self.dir.join(format!("{name}.key")),
        }
    }

    /// Issues a client with an arbitrary organization and validity window.
    pub fn issue(
        &self,
        name: &str,
        org: Option<&str>,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Credentials {
        pki::issue_client_with(&self.dir, name, org, not_before, not_after).expect("issue client");
        self.client(name)
    }

    /// A client certificate that expired yesterday.
    pub fn expired(&self, name: &str) -> Credentials {
        let now = OffsetDateTime::now_utc();
        self.issue(
            name,
            Some("covet:admin"),
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        )
    }

    /// An admin client issued by another CA (in `dir/other`), trusting our CA.
    pub fn foreign(&self, name: &str) -> Credentials {
        let other = self.dir.join("other");
        if !other.join("ca.crt").exists() {
            pki::init_ca(&other, &pki::CaOptions::default()).expect("init foreign CA");
        }
        pki::issue_client(&other, name, Role::Admin, Duration::from_secs(86400))
            .expect("issue foreign client");
        Credentials {
            ca: self.ca(),
            cert: other.join(format!("{name}.crt")),
            key: other.join(format!("{name}.key")),
        }
    }
}
