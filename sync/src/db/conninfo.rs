//! Connection parameters to a PostgreSQL server, rendered either as a libpq
//! conninfo string (for `primary_conninfo`, `pg_basebackup`, `pg_rewind`)
//! or as a `tokio-postgres` configuration (for the sidecar's own queries).
//!
//! Credentials come from the caller (the binary reads them from files
//! mounted from a Secret, or the environment); the password is never put on
//! a command line, where `ps` would show it, only in the environment of the
//! child tool (`PGPASSWORD`) and, through `-R`, in `postgresql.auto.conf`
//! (mode 0600, owned by the server user), as `pg_basebackup -R` does.

use std::fmt;
use std::time::Duration;

/// Where and as whom to connect.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnParams {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Role name.
    pub user: String,
    /// Password, if the server asks for one.
    pub password: Option<String>,
    /// Database for SQL connections (`postgres` is always there).
    pub dbname: String,
    /// libpq `sslmode` for replication and tool connections (`disable`,
    /// `prefer`, `require`, `verify-ca`, `verify-full`); `None` keeps
    /// libpq's default (`prefer`).
    pub sslmode: Option<String>,
    /// CA bundle that signs the peer's server certificate (`verify-ca`,
    /// `verify-full`).
    pub sslrootcert: Option<String>,
    /// Name the standby reports to its primary; what
    /// `synchronous_standby_names` lists.
    pub application_name: Option<String>,
}

impl fmt::Debug for ConnParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the password.
        f.debug_struct("ConnParams")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("sslmode", &self.sslmode)
            .field("application_name", &self.application_name)
            .finish()
    }
}

/// Quotes a conninfo value: single quotes, with `\` and `'` escaped (libpq
/// rules), so that any value survives.
pub fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

impl ConnParams {
    /// Parameters for `host:port` as `user` on database `postgres`.
    pub fn new(host: impl Into<String>, port: u16, user: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            port,
            user: user.into(),
            password: None,
            dbname: "postgres".into(),
            sslmode: None,
            sslrootcert: None,
            application_name: None,
        }
    }

    /// The conninfo string without the password (the password goes in
    /// `PGPASSWORD` for tools). `with_dbname` adds `dbname`; replication
    /// connections ignore it but `pg_rewind` needs one.
    pub fn conninfo(&self, with_dbname: bool) -> String {
        let mut parts = vec![
            format!("host={}", quote(&self.host)),
            format!("port={}", self.port),
            format!("user={}", quote(&self.user)),
        ];
        if with_dbname {
            parts.push(format!("dbname={}", quote(&self.dbname)));
        }
        if let Some(mode) = &self.sslmode {
            parts.push(format!("sslmode={}", quote(mode)));
        }
        if let Some(ca) = &self.sslrootcert {
            parts.push(format!("sslrootcert={}", quote(ca)));
        }
        if let Some(app) = &self.application_name {
            parts.push(format!("application_name={}", quote(app)));
        }
        parts.join(" ")
    }

    /// The conninfo string with the password, for `primary_conninfo`.
    pub fn conninfo_with_password(&self) -> String {
        match &self.password {
            Some(pw) => format!("{} password={}", self.conninfo(false), quote(pw)),
            None => self.conninfo(false),
        }
    }

    /// The same server under another application name.
    pub fn with_application_name(&self, name: Option<&str>) -> Self {
        Self {
            application_name: name.map(str::to_owned),
            ..self.clone()
        }
    }

    /// A `tokio-postgres` configuration for SQL connections from the
    /// sidecar, without TLS: [`super::pg::connect`] adds it from `sslmode`
    /// and `sslrootcert` ([`super::tls`]).
    pub fn tokio_config(&self, connect_timeout: Duration) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .connect_timeout(connect_timeout)
            .application_name("counterweight-sync");
        if let Some(pw) = &self.password {
            c.password(pw);
        }
        c
    }
}

/// The `host` and `port` a conninfo string points at, or `None` if it names
/// neither. Understands the `key=value` form with libpq quoting, which is
/// what PostgreSQL shows for `primary_conninfo`.
pub fn target_of(conninfo: &str) -> Option<(String, u16)> {
    let pairs = parse_pairs(conninfo)?;
    let mut host = None;
    let mut port = None;
    for (k, v) in pairs {
        match k.as_str() {
            "host" | "hostaddr" => host = Some(v),
            "port" => port = v.parse().ok(),
            _ => {}
        }
    }
    Some((host?, port.unwrap_or(5432)))
}

/// Splits a libpq `key=value` conninfo into pairs.
fn parse_pairs(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return None;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next()? {
                    '\\' => value.push(chars.next()?),
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_reads_back_its_target() {
        let mut p = ConnParams::new("db.east.svc", 5433, "repl");
        p.password = Some(r"it's a \secret".into());
        p.sslmode = Some("verify-full".into());
        p.application_name = Some("west".into());
        let ci = p.conninfo_with_password();
        assert!(ci.contains(r"password='it\'s a \\secret'"), "{ci}");
        assert!(ci.contains("sslmode='verify-full'"), "{ci}");
        assert_eq!(target_of(&ci), Some(("db.east.svc".into(), 5433)));
        assert!(!p.conninfo(true).contains("password"));
        assert!(!format!("{p:?}").contains("secret"));
    }

    #[test]
    fn reads_what_pg_basebackup_writes() {
        let written = "user=counterweight password=pw-1 channel_binding=prefer host=127.0.0.1 port=40001 sslmode=prefer sslcompression=0 target_session_attrs=any";
        assert_eq!(target_of(written), Some(("127.0.0.1".into(), 40001)));
        assert_eq!(target_of(""), None);
        assert_eq!(target_of("host='unterminated"), None);
        assert_eq!(target_of("host=a"), Some(("a".into(), 5432)));
    }
}
