"""The two kinds of work the search loop runs in threads: asking the LLM for a candidate (with
re-asks when a reply holds no usable code), and evaluating a candidate file with the evaluator.
Each records what it did in the archive; neither decides what to do next."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from evo import evaluator
from evo.archive import Archive
from evo.prompts import PromptBuilder
from evo.provider import Message, ProviderMix
from evo.replies import NoUsableCode, parse_reply
from evo.search import Job
from evo.session import TaskSession
from evo.task import Task
from evo.verdict import Verdict


@dataclass
class Produced:
    """What one LLM job produced."""

    job: Job
    source: str | None = None  # the candidate file, None when no reply held usable code
    llm_call_id: int | None = None  # the call whose reply held it
    problem: str | None = None  # why there is no source
    calls: list[int] = field(default_factory=list)  # every call made, re-asks included
    cost_usd: float = 0.0  # of those calls


def produce(llm: ProviderMix, builder: PromptBuilder, archive: Archive, run_id: str, task: Task, job: Job,
            prompt: str, re_asks: int) -> Produced:
    """Ask for a candidate; when the reply has no usable code, say so and ask again. Provider
    errors propagate: the loop decides whether the run can go on."""
    produced = Produced(job)
    messages = [Message(role="user", content=prompt)]
    try:
        for attempt in Retrying(stop=stop_after_attempt(1 + re_asks), retry=retry_if_exception_type(NoUsableCode),
                                reraise=True):
            with attempt:
                completion = llm.complete(builder.system(), messages)
                call_id = archive.add_llm_call(
                    run_id, provider=completion.provider, model=completion.model, task=str(task.path),
                    prompt=json.dumps({"system": builder.system(), "messages": [m.model_dump() for m in messages]}),
                    reply=completion.text, input_tokens=completion.input_tokens,
                    output_tokens=completion.output_tokens, cached_input_tokens=completion.cached_input_tokens,
                    cost_usd=completion.cost_usd, latency_s=completion.latency_s, scripted=completion.scripted)
                produced.calls.append(call_id)
                produced.cost_usd += completion.cost_usd
                try:
                    parsed = parse_reply(completion.text)
                except NoUsableCode as err:
                    messages += [Message(role="assistant", content=completion.text),
                                 Message(role="user", content=builder.no_code(err.reason))]
                    raise
                produced.source, produced.llm_call_id = parsed.source, call_id
    except NoUsableCode as err:
        produced.problem = f"no usable code after {1 + re_asks} replies: {err.reason}"
    return produced


def candidate_file(run_dir: Path, candidate_id: int, source: str) -> Path:
    """Where a candidate's source lives for the evaluator (rewritten from the archive on resume)."""
    path = run_dir / "candidates" / f"c{candidate_id}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != source:
        path.write_text(source)
    return path


def evaluate(path: Path, session: TaskSession) -> Verdict:
    """One verification in the session of its task and device. Evaluations on the same device
    take turns on it (the evaluator's device lock), so builds of several candidates overlap one
    candidate's timing."""
    return evaluator.verify(session.task, path, session.policy, session=session)
