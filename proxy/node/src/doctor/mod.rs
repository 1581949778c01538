//! `iamlet doctor`'s checks, one family per file, each printing one line —
//! `OK|WARN|FAIL <check>: <what was found / what to do>`. The command itself (which flags,
//! adopting the running agent's, the exit code) is the binary's; these take checked values.

pub mod imds;
pub mod interfaces;
pub mod iptables;
pub mod kubernetes;
pub mod ports;
pub mod sts;

use std::fmt;

/// A verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub level: Level,
    pub name: &'static str,
    pub text: String,
}

impl Check {
    pub fn ok(name: &'static str, text: impl Into<String>) -> Check {
        Check {
            level: Level::Ok,
            name,
            text: text.into(),
        }
    }
    pub fn warn(name: &'static str, text: impl Into<String>) -> Check {
        Check {
            level: Level::Warn,
            name,
            text: text.into(),
        }
    }
    pub fn fail(name: &'static str, text: impl Into<String>) -> Check {
        Check {
            level: Level::Fail,
            name,
            text: text.into(),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = match self.level {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        // One line, whatever a tool printed.
        let text = self.text.replace('\n', " ");
        write!(f, "{l} {}: {text}", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_have_the_documented_shape() {
        assert_eq!(
            Check::ok("port", "port 8181 (--app-port) is free").to_string(),
            "OK port: port 8181 (--app-port) is free"
        );
        assert_eq!(
            Check::warn("region", "a\nb").to_string(),
            "WARN region: a b"
        );
        assert_eq!(Check::fail("iptables", "x").to_string(), "FAIL iptables: x");
        assert!(Level::Fail > Level::Warn && Level::Warn > Level::Ok);
    }
}
