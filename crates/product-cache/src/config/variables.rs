//! Every environment variable the functions read, as data: its name, the concern it belongs to,
//! the functions that read it, its default and its unit.
//!
//! This table is the one list the rest is checked against. A test below parses each function's
//! settings the way its start-up does and records the names asked for (the table must name
//! exactly those, with those functions), and sets each documented default explicitly (which
//! must change nothing); another parses `docs/configuration.md` and compares its tables with
//! this one. The local stack (`pcache dev`) takes the list of names from here too.

/// A Lambda function of the product: which settings its start-up parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Function {
    /// `read-function`: `ReadSettings`, `MetricsSettings`.
    Read,
    /// `invalidator-function`: `InvalidatorSettings`, `MetricsSettings`.
    Invalidator,
    /// `inspector-function`: `ReadSettings`, `InspectSettings`, `MetricsSettings`.
    Inspector,
}

impl Function {
    pub const ALL: [Function; 3] = [Function::Read, Function::Invalidator, Function::Inspector];

    /// As the configuration page writes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Invalidator => "invalidator",
            Self::Inspector => "inspector",
        }
    }
}

/// What a variable is about: the configuration page has one table per concern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concern {
    /// Where the cache is and how to connect to it: the deployment's topology. The local stack
    /// sets these itself for the cache it runs.
    Connection,
    /// Bounds on Redis calls, and what happens when a node stops answering.
    RedisCalls,
    /// The table, its key and the bounds on its calls.
    Table,
    /// Cache keys, entry lifetimes, leases and how changes are applied.
    Caching,
    /// The metrics lines.
    Metrics,
    /// The inspector and its change monitor.
    Inspection,
}

impl Concern {
    /// The heading of its table on the configuration page.
    pub fn title(self) -> &'static str {
        match self {
            Self::Connection => "Connecting to the cache",
            Self::RedisCalls => "Redis calls",
            Self::Table => "The table",
            Self::Caching => "Caching, leases and ordering",
            Self::Metrics => "Metrics",
            Self::Inspection => "The inspector and the change monitor",
        }
    }
}

/// What applies when a variable is unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenUnset {
    /// This value, written as the variable would be.
    Default(&'static str),
    /// Nothing: the feature it turns on is off.
    Off,
    /// The function does not start without it.
    Required,
    /// The function does not start without it when the named variable is set.
    RequiredWith(&'static str),
}

impl std::fmt::Display for WhenUnset {
    /// As the configuration page writes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Default(v) => write!(f, "`{v}`"),
            Self::Off => f.write_str("unset"),
            Self::Required => f.write_str("required"),
            Self::RequiredWith(other) => write!(f, "required with `{other}`"),
        }
    }
}

/// One environment variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variable {
    pub name: &'static str,
    pub concern: Concern,
    /// The functions whose start-up parses it (and refuses to start on a malformed value), in
    /// [`Function::ALL`]'s order.
    pub functions: &'static [Function],
    pub when_unset: WhenUnset,
    /// `ms`, `s`, a count's noun, or `-` for text, switches and choices.
    pub unit: &'static str,
}

impl Variable {
    /// The value that applies when the variable is unset, if there is one.
    pub fn default_value(&self) -> Option<&'static str> {
        match self.when_unset {
            WhenUnset::Default(v) => Some(v),
            _ => None,
        }
    }
}

use Function::{Inspector as Insp, Invalidator as Inv, Read};

const ALL: &[Function] = &[Read, Inv, Insp];
const TABLE_READERS: &[Function] = &[Read, Insp];
const INVALIDATOR: &[Function] = &[Inv];
const INSPECTOR: &[Function] = &[Insp];

const fn var(
    name: &'static str,
    concern: Concern,
    functions: &'static [Function],
    when_unset: WhenUnset,
    unit: &'static str,
) -> Variable {
    Variable {
        name,
        concern,
        functions,
        when_unset,
        unit,
    }
}

use Concern::*;
use WhenUnset::{Default as Value, Off as Unset, Required, RequiredWith};

/// Every variable the functions read, grouped by concern in the configuration page's order.
pub const VARIABLES: &[Variable] = &[
    var("REDIS_URL", Connection, ALL, Required, "-"),
    var("REDIS_CLUSTER", Connection, ALL, Value("false"), "-"),
    var("REDIS_CACHE_TYPE", Connection, ALL, Value("nodes"), "-"),
    var("REDIS_AUTH_SECRET_ARN", Connection, ALL, Unset, "-"),
    var("REDIS_IAM_USER", Connection, ALL, Unset, "-"),
    var(
        "REDIS_IAM_CACHE_NAME",
        Connection,
        ALL,
        RequiredWith("REDIS_IAM_USER"),
        "-",
    ),
    var("REDIS_IAM_REPLICATION_GROUP", Connection, ALL, Unset, "-"),
    var("REDIS_CA_FILE", Connection, ALL, Unset, "-"),
    var(
        "REDIS_CONFIRM_REPLICAS",
        Connection,
        ALL,
        Value("0"),
        "replicas",
    ),
    var(
        "REDIS_READ_FROM_REPLICAS",
        Connection,
        ALL,
        Value("false"),
        "-",
    ),
    var("REDIS_TIMEOUT_MS", RedisCalls, ALL, Value("100"), "ms"),
    var(
        "REDIS_CONNECT_TIMEOUT_MS",
        RedisCalls,
        ALL,
        Value("2000"),
        "ms",
    ),
    var(
        "REDIS_CONFIRM_TIMEOUT_MS",
        RedisCalls,
        ALL,
        Value("500"),
        "ms",
    ),
    var(
        "REDIS_TCP_KEEPALIVE_SECS",
        RedisCalls,
        ALL,
        Value("30"),
        "s",
    ),
    var(
        "REDIS_BREAKER_FAILURES",
        RedisCalls,
        ALL,
        Value("3"),
        "failures",
    ),
    var(
        "REDIS_BREAKER_OPEN_MS",
        RedisCalls,
        ALL,
        Value("1000"),
        "ms",
    ),
    var("TABLE_NAME", Table, TABLE_READERS, Required, "-"),
    var("KEY_ATTRIBUTE", Table, ALL, Value("productId"), "-"),
    var("KEY_TYPE", Table, ALL, Value("S"), "-"),
    var("CONSISTENT_READ", Table, TABLE_READERS, Value("true"), "-"),
    var(
        "DYNAMODB_ATTEMPT_TIMEOUT_MS",
        Table,
        TABLE_READERS,
        Value("1000"),
        "ms",
    ),
    var(
        "DYNAMODB_TIMEOUT_MS",
        Table,
        TABLE_READERS,
        Value("3000"),
        "ms",
    ),
    var("KEY_PREFIX", Caching, ALL, Value("product:"), "-"),
    var("CACHE_TTL_SECONDS", Caching, ALL, Value("3600"), "s"),
    var("NEGATIVE_TTL_SECONDS", Caching, ALL, Value("30"), "s"),
    var("LEASE_MS", Caching, ALL, Value("4000"), "ms"),
    var("LEASE_WAIT_MS", Caching, ALL, Value("1000"), "ms"),
    var(
        "INVALIDATION_MODE",
        Caching,
        INVALIDATOR,
        Value("delete"),
        "-",
    ),
    var("VERSION_ATTRIBUTE", Caching, ALL, Unset, "-"),
    var("CLOCK_MARGIN_MS", Caching, ALL, Value("2000"), "ms"),
    var(
        "METRICS_NAMESPACE",
        Metrics,
        ALL,
        Value("ProductCache"),
        "-",
    ),
    var("METRICS_SERVICE", Metrics, ALL, Value("product-cache"), "-"),
    var(
        "INSPECT_SAMPLE",
        Inspection,
        INSPECTOR,
        Value("200"),
        "keys",
    ),
    var(
        "INSPECT_GRACE_MS",
        Inspection,
        INSPECTOR,
        Value("5000"),
        "ms",
    ),
    var("INSPECT_REPAIR", Inspection, INSPECTOR, Value("false"), "-"),
    var("MONITOR_SHARE", Inspection, INSPECTOR, Value("1"), "share"),
    var(
        "INVALIDATOR_PARALLELIZATION_FACTOR",
        Inspection,
        INSPECTOR,
        Value("1"),
        "batches a shard",
    ),
];

/// The variable called `name`, if the functions read one.
pub fn variable(name: &str) -> Option<&'static Variable> {
    VARIABLES.iter().find(|v| v.name == name)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    use super::*;
    use crate::config::{ConfigError, InvalidatorSettings, ReadSettings, Source};
    use crate::inspect::InspectSettings;
    use crate::metrics::MetricsSettings;

    /// A source that answers from `values` and remembers every name asked for.
    struct Recording<'a> {
        values: &'a [(&'a str, &'a str)],
        asked: RefCell<BTreeSet<String>>,
    }

    impl Source for Recording<'_> {
        fn get(&self, name: &str) -> Option<String> {
            self.asked.borrow_mut().insert(name.to_owned());
            Source::get(self.values, name)
        }
    }

    /// What `function`'s start-up parses (`startup::*_from_env`), from `src`, in Debug form so
    /// two parses can be compared whatever the types.
    fn parse(function: Function, src: &(impl Source + ?Sized)) -> Result<String, ConfigError> {
        let metrics = MetricsSettings::from_source(src)?;
        Ok(match function {
            Function::Read => format!("{:?}{metrics:?}", ReadSettings::from_source(src)?),
            Function::Invalidator => {
                format!("{:?}{metrics:?}", InvalidatorSettings::from_source(src)?)
            }
            Function::Inspector => format!(
                "{:?}{:?}{metrics:?}",
                ReadSettings::from_source(src)?,
                InspectSettings::from_source(src)?
            ),
        })
    }

    /// What a function needs to start at all.
    const REQUIRED: &[(&str, &str)] = &[("REDIS_URL", "redis://h:6379"), ("TABLE_NAME", "T")];

    #[test]
    fn the_table_names_exactly_what_each_function_reads() {
        for function in Function::ALL {
            let src = Recording {
                values: REQUIRED,
                asked: RefCell::default(),
            };
            parse(function, &src).unwrap();
            let asked = src.asked.into_inner();
            let listed: BTreeSet<String> = VARIABLES
                .iter()
                .filter(|v| v.functions.contains(&function))
                .map(|v| v.name.to_owned())
                .collect();
            assert_eq!(
                asked,
                listed,
                "the {} function reads {:?} but VARIABLES does not list them for it, and \
                 VARIABLES lists {:?} that it does not read",
                function.name(),
                asked.difference(&listed).collect::<Vec<_>>(),
                listed.difference(&asked).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn each_listed_default_is_what_an_unset_variable_gives() {
        for v in VARIABLES {
            let Some(value) = v.default_value() else {
                continue;
            };
            for &function in v.functions {
                let unset = parse(function, REQUIRED).unwrap();
                let mut explicit = REQUIRED.to_vec();
                explicit.push((v.name, value));
                let set = parse(function, &explicit[..]).unwrap_or_else(|e| {
                    panic!("{}={value} (its listed default) is refused: {e}", v.name)
                });
                assert_eq!(
                    set,
                    unset,
                    "{}: the listed default {value} is not what the {} function uses when it \
                     is unset",
                    v.name,
                    function.name()
                );
            }
        }
    }

    #[test]
    fn names_are_listed_once_and_functions_in_order() {
        let mut seen = BTreeSet::new();
        for v in VARIABLES {
            assert!(seen.insert(v.name), "{} is listed twice", v.name);
            assert!(
                v.functions.windows(2).all(|w| w[0] < w[1]),
                "{}: functions out of order",
                v.name
            );
        }
    }

    /// A row of one of the page's tables: its section's heading and its first four cells.
    #[derive(Debug, PartialEq)]
    struct Row {
        section: String,
        name: String,
        functions: String,
        default: String,
        unit: String,
    }

    /// Every table row of `docs/configuration.md` that names a variable.
    fn page_rows() -> Vec<Row> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md");
        let page = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut section = String::new();
        let mut rows = Vec::new();
        for line in page.lines() {
            if let Some(heading) = line.strip_prefix("## ") {
                section = heading.trim().to_owned();
            }
            let Some(cells) = line.strip_prefix("| `") else {
                continue;
            };
            let line_cells = format!("`{cells}");
            let cells: Vec<&str> = line_cells.split(" | ").map(str::trim).collect();
            assert!(cells.len() >= 5, "a row with fewer than five cells: {line}");
            rows.push(Row {
                section: section.clone(),
                name: cells[0].trim_matches('`').to_owned(),
                functions: cells[1].to_owned(),
                default: cells[2].to_owned(),
                unit: cells[3].to_owned(),
            });
        }
        rows
    }

    #[test]
    fn the_configuration_page_lists_every_variable_as_the_code_has_it() {
        let rows = page_rows();
        for v in VARIABLES {
            let functions: Vec<&str> = v.functions.iter().map(|f| f.name()).collect();
            let expected = Row {
                section: v.concern.title().to_owned(),
                name: v.name.to_owned(),
                functions: functions.join(", "),
                default: v.when_unset.to_string(),
                unit: v.unit.to_owned(),
            };
            let found: Vec<&Row> = rows.iter().filter(|r| r.name == v.name).collect();
            match found[..] {
                [row] => assert_eq!(
                    row, &expected,
                    "docs/configuration.md's row of {} differs from VARIABLES",
                    v.name
                ),
                [] => panic!("docs/configuration.md has no row for {}", v.name),
                _ => panic!(
                    "docs/configuration.md has {} rows for {}",
                    found.len(),
                    v.name
                ),
            }
        }
        for row in &rows {
            assert!(
                variable(&row.name).is_some(),
                "docs/configuration.md lists {}, which no function reads",
                row.name
            );
        }
    }
}
