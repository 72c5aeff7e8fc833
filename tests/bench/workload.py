"""The benchmark's requests: a seeded, repeatable mix, saved as JSON so every system runs the same ones.

Prompts are real English cut to an exact token length with the model's tokenizer and sent as
token ids, so tokenloom, HF `generate` and transformers' continuous batching see identical inputs.
Lengths are log-uniform (short requests common, long ones present), `ignore_eos` always, so every
system generates exactly `max_new_tokens` tokens per request.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

# Plain sentences shuffled per request: enough variety that no two long prompts share their text.
SENTENCES = """\
The harbour was quiet in the early morning, and the boats rocked gently against the pier.
A map is a promise that the world can be folded and carried in a pocket.
She wrote the numbers down twice, because the first time the pencil had broken halfway through.
Bees find their way home by the angle of the sun, even when clouds cover most of the sky.
The old computer hummed for a minute before the screen showed a single blinking cursor.
Rivers carry more than water: they move sand, seeds, stories and sometimes whole villages.
When the train left the station, the snow began to fall over the empty platform.
The library kept a copy of every newspaper printed in the town since eighteen forty.
Coffee was first traded across the Red Sea, long before it reached the cafes of Europe.
A thunderstorm can release more energy in an hour than a small city uses in a month.
He planted tomatoes along the fence and basil between them, as his grandmother had done.
The moon is slowly drifting away from the Earth, a few centimetres every year.
Jazz musicians often say that the notes you do not play matter as much as the ones you do.
In winter the lake froze so thick that trucks could drive across it to the island.
The robot paused, tilted its camera, and asked whether the box should go on the top shelf.
Every good recipe starts with a list, and every good list starts with a clear idea of the meal.
The bridge was closed for repairs, so the bus took the long road around the valley.
Scientists measured the temperature of the soil at ten depths, every hour, for a whole year.
The museum guide explained how the painting had been restored after the flood.
A compiler turns the words of a program into instructions that a processor can follow.
The market opened at dawn, and by eight o'clock the best peaches were already gone.
Lighthouses once needed a keeper who climbed the stairs every evening to light the lamp.
The children built a raft from old barrels and paddled it across the pond.
Most of the universe is empty space, yet the night sky seems crowded with stars.
The letter arrived three weeks late, its envelope stamped by four different post offices.
Good documentation answers the question the reader is about to ask.
The orchestra tuned to a single note from the oboe before the concert began.
A glacier moves so slowly that a footprint on it may take a century to reach the sea.
The village council voted to repaint the school in the colours the students had chosen.
Some birds migrate thousands of kilometres and return to the very same tree each spring.
The engineer checked the pressure gauge, wrote down the reading, and tightened the valve.
Old maps often marked unknown lands with drawings of sea monsters and strange animals.
The bakery's ovens were lit at four in the morning so the bread would be ready by seven.
A good question can be more useful than a long answer.
The wind turned the windmill's sails faster than anyone in the village could remember.
The detective noticed that the clock on the wall had stopped at exactly ten past nine.
Tea leaves are picked by hand on steep hillsides where machines cannot reach.
The satellite passed overhead every ninety minutes, a small bright dot moving among the stars.
Her garden had no lawn at all, only paths of gravel between beds of herbs and flowers.
The history of writing begins with tallies scratched on clay to count sheep and grain.
""".splitlines()

MODES = ("greedy", "sampled", "beam")


@dataclass(frozen=True)
class Request:
    index: int  # arrival order
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    mode: str  # one of MODES
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    num_beams: int = 1

    def sdk_params(self) -> dict:
        """Keyword arguments for `tokenloom_client` generate / stream (HF names)."""
        params = {"max_new_tokens": self.max_new_tokens, "ignore_eos": True}
        if self.mode == "sampled":
            params.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        elif self.mode == "beam":
            params.update(num_beams=self.num_beams)
        return params

    def openai_params(self) -> dict:
        """The same request for the HTTP front's /v1/completions (OpenAI names; ours in extra_body).
        top_k 50 is gRPC's default (HF's), which HTTP leaves off unless asked."""
        extra = {"ignore_eos": True, "return_token_ids": True, "top_k": 50}
        params = {"max_tokens": self.max_new_tokens, "temperature": 0, "extra_body": extra}
        if self.mode == "sampled":
            params.update(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        elif self.mode == "beam":
            extra["num_beams"] = self.num_beams
        return params


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 128
    seed: int = 0
    prompt_tokens: tuple[int, int] = (16, 512)
    new_tokens: tuple[int, int] = (16, 256)
    sampled_fraction: float = 0.35
    beam_fraction: float = 0.04
    max_beams: int = 4


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return round(math.exp(rng.uniform(math.log(low), math.log(high))))


def prompt_ids(rng: random.Random, tokenizer, length: int) -> tuple[int, ...]:
    """Shuffled sentences, tokenised, cut to exactly `length` tokens."""
    ids: list[int] = []
    while len(ids) < length:
        sentences = SENTENCES[:]
        rng.shuffle(sentences)
        ids += tokenizer.encode(" ".join(sentences) + " ", add_special_tokens=False)
    return tuple(ids[:length])


def _modes(rng: random.Random, spec: WorkloadSpec) -> list[str]:
    """Exact shares, shuffled: at least one beam request in any workload of 8 or more."""
    n = spec.num_requests
    beams = max(1 if n >= 8 else 0, round(n * spec.beam_fraction))
    sampled = round(n * spec.sampled_fraction)
    modes = ["beam"] * beams + ["sampled"] * sampled + ["greedy"] * (n - beams - sampled)
    rng.shuffle(modes)
    return modes


def build(spec: WorkloadSpec, tokenizer) -> list[Request]:
    rng = random.Random(spec.seed)
    requests = []
    for i, mode in enumerate(_modes(rng, spec)):
        prompt_len = _log_uniform(rng, *spec.prompt_tokens)
        new_tokens = _log_uniform(rng, *spec.new_tokens)
        if mode == "beam":
            req = Request(i, (), new_tokens, mode, num_beams=rng.randint(2, spec.max_beams))
        elif mode == "sampled":
            req = Request(i, (), new_tokens, mode, temperature=round(rng.uniform(0.6, 1.0), 2),
                          top_p=rng.choice((0.9, 0.95, 1.0)), seed=rng.randrange(2**31))
        else:
            req = Request(i, (), new_tokens, mode)
        requests.append(_with_prompt(req, prompt_ids(rng, tokenizer, prompt_len)))
    return requests


def _with_prompt(req: Request, prompt_ids: tuple[int, ...]) -> Request:
    return Request(**{**asdict(req), "prompt_ids": prompt_ids})


def save(path: Path, spec: WorkloadSpec, requests: list[Request]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    spec_json = {**asdict(spec), "prompt_tokens": list(spec.prompt_tokens), "new_tokens": list(spec.new_tokens)}
    body = {"spec": spec_json, "requests": [{**asdict(r), "prompt_ids": list(r.prompt_ids)} for r in requests]}
    path.write_text(json.dumps(body))


def load(path: Path) -> list[Request]:
    body = json.loads(path.read_text())
    return [Request(**{**r, "prompt_ids": tuple(r["prompt_ids"])}) for r in body["requests"]]


def describe(requests: list[Request]) -> dict:
    """Counts and mean lengths, for the report."""
    n = len(requests) or 1
    return {
        "requests": len(requests),
        "modes": {m: sum(r.mode == m for r in requests) for m in MODES},
        "mean_prompt_tokens": sum(len(r.prompt_ids) for r in requests) / n,
        "mean_new_tokens": sum(r.max_new_tokens for r in requests) / n,
    }
