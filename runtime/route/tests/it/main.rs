//! blyan-route's rules, each test named after the rule ids it checks.

mod commit;
mod fault;
mod heartbeat;
mod route;
mod spot;
