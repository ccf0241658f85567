//! A run fails on a step definition no scenario used (cucumber has an option for undefined and
//! skipped steps, none for unused ones). The writer below sits in front of the usual ones and
//! records, for every step that ran (passed or failed), its keyword and the location of the
//! definition it matched; `unused` compares that with every definition the step macros
//! registered.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use cucumber::codegen::{StepConstructor, WorldInventory};
use cucumber::gherkin::StepType;
use cucumber::step::Location;
use cucumber::{event, parser, writer, Event, World, Writer};

/// A step definition: its keyword and where it is defined.
pub type Definition = (&'static str, Location);

fn keyword(ty: StepType) -> &'static str {
    match ty {
        StepType::Given => "Given",
        StepType::When => "When",
        StepType::Then => "Then",
    }
}

/// Every step definition of `W` (one per `#[given]`, `#[when]` or `#[then]` attribute).
pub fn defined<W: WorldInventory>() -> BTreeSet<Definition> {
    let given = cucumber::codegen::inventory::iter::<W::Given>
        .into_iter()
        .map(|s| ("Given", s.inner().0));
    let when = cucumber::codegen::inventory::iter::<W::When>
        .into_iter()
        .map(|s| ("When", s.inner().0));
    let then = cucumber::codegen::inventory::iter::<W::Then>
        .into_iter()
        .map(|s| ("Then", s.inner().0));
    given.chain(when).chain(then).collect()
}

/// Records the definitions that matched a step, then hands the event on to `inner`.
pub struct RecordUsed<Wr> {
    inner: Wr,
    used: Arc<Mutex<BTreeSet<Definition>>>,
}

impl<Wr> RecordUsed<Wr> {
    pub fn new(inner: Wr) -> (Self, Arc<Mutex<BTreeSet<Definition>>>) {
        let used = Arc::new(Mutex::new(BTreeSet::new()));
        (
            RecordUsed {
                inner,
                used: used.clone(),
            },
            used,
        )
    }
}

/// The definition a step event says it matched, if any.
fn matched<W>(ev: &event::Cucumber<W>) -> Option<Definition> {
    let event::Cucumber::Feature(_, feature) = ev else {
        return None;
    };
    let scenario = match feature {
        event::Feature::Scenario(_, s) => &s.event,
        event::Feature::Rule(_, event::Rule::Scenario(_, s)) => &s.event,
        _ => return None,
    };
    let (step, ev) = match scenario {
        event::Scenario::Step(step, ev) | event::Scenario::Background(step, ev) => (step, ev),
        _ => return None,
    };
    let location = match ev {
        event::Step::Passed(_, loc) => *loc,
        event::Step::Failed(_, loc, _, _) => *loc,
        _ => None,
    }?;
    Some((keyword(step.ty), location))
}

impl<W: World, Wr: Writer<W>> Writer<W> for RecordUsed<Wr> {
    type Cli = Wr::Cli;

    async fn handle_event(
        &mut self,
        ev: parser::Result<Event<event::Cucumber<W>>>,
        cli: &Self::Cli,
    ) {
        if let Some(def) = ev.as_ref().ok().and_then(|e| matched(&e.value)) {
            self.used
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert(def);
        }
        self.inner.handle_event(ev, cli).await;
    }
}

impl<W, Wr: writer::Stats<W>> writer::Stats<W> for RecordUsed<Wr>
where
    Self: Writer<W>,
{
    fn passed_steps(&self) -> usize {
        self.inner.passed_steps()
    }

    fn skipped_steps(&self) -> usize {
        self.inner.skipped_steps()
    }

    fn failed_steps(&self) -> usize {
        self.inner.failed_steps()
    }

    fn retried_steps(&self) -> usize {
        self.inner.retried_steps()
    }

    fn parsing_errors(&self) -> usize {
        self.inner.parsing_errors()
    }

    fn hook_errors(&self) -> usize {
        self.inner.hook_errors()
    }
}

impl<Wr: writer::Normalized> writer::Normalized for RecordUsed<Wr> {}
