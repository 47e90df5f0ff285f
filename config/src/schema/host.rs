//! `host:` — the appliance itself: hostname, console, log level, the remote API, idle behaviour.

use super::*;

// ------------------------------------------------------------------ host

/// Settings of the appliance itself.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// The appliance's hostname (a DNS label, or dotted labels).
    #[serde(default = "default_hostname")]
    pub hostname: Spanned<String>,
    /// Kernel console device for the appliance's logs, e.g. ttyS0 or tty0.
    #[serde(default = "default_console")]
    pub console: Spanned<String>,
    /// How much keel-init logs.
    #[serde(default)]
    pub log_level: LogLevel,
    /// What the appliance does once every guest has stopped and none is waiting
    /// to restart: `stay` up (the default), or `poweroff` (batch appliances, CI).
    #[serde(default)]
    pub on_idle: OnIdle,
    /// The control API on TCP, with a bearer token. Off unless set; the root-only
    /// unix socket /run/keel/api.sock is always there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<ApiListener>,
}

/// `host.api`: where the control API listens on TCP.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiListener {
    /// Address and port, e.g. 0.0.0.0:7070. Plain HTTP: use a management network.
    pub listen: Spanned<std::net::SocketAddr>,
    /// File on KEEL-CONFIG holding the bearer token (16 characters or more).
    #[serde(default = "default_token_file")]
    pub token_file: Spanned<String>,
}

fn default_token_file() -> Spanned<String> {
    Spanned::new("api-token".into(), Default::default())
}

impl Decode for ApiListener {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "api", d)?;
        let listen = m.required("listen");
        let token_file = m.optional("token_file").map(|v| v.unwrap_or_else(default_token_file));
        m.finish();
        build!(ApiListener { listen, token_file })
    }
}

impl Decode for std::net::SocketAddr {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let text = scalar(node, "an address and port such as 0.0.0.0:7070", d)?;
        match text.parse() {
            Ok(v) => Some(v),
            Err(_) => {
                d.error(
                    node.pos,
                    format!("`{text}` is not an address and port; write e.g. 0.0.0.0:7070"),
                );
                None
            }
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnIdle {
    #[default]
    Stay,
    Poweroff,
}

impl Decode for OnIdle {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        one_of(node, &[("stay", OnIdle::Stay), ("poweroff", OnIdle::Poweroff)], d)
    }
}

fn default_hostname() -> Spanned<String> {
    Spanned::new("keel".into(), Default::default())
}
fn default_console() -> Spanned<String> {
    Spanned::new("ttyS0".into(), Default::default())
}

impl Default for Host {
    fn default() -> Self {
        Host {
            hostname: default_hostname(),
            console: default_console(),
            log_level: LogLevel::default(),
            on_idle: OnIdle::Stay,
            api: None,
        }
    }
}

impl Decode for Host {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "host", d)?;
        let hostname = m.optional("hostname").map(|v| v.unwrap_or_else(default_hostname));
        let console = m.optional("console").map(|v| v.unwrap_or_else(default_console));
        let log_level = m.or_default("log_level");
        let on_idle = m.or_default("on_idle");
        let api = m.optional("api");
        m.finish();
        build!(Host {
            hostname,
            console,
            log_level,
            on_idle,
            api
        })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

impl Decode for LogLevel {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        use LogLevel::*;
        one_of(
            node,
            &[
                ("error", Error),
                ("warn", Warn),
                ("info", Info),
                ("debug", Debug),
                ("trace", Trace),
            ],
            d,
        )
    }
}
