"""DreamBooth subjects of the toy world that lens-toy never saw, and the prompts that measure them.

- `two-tone-star` (trigger `sks`, class "star"): a known shape with a look the base world never has, a star whose
  upper half is yellow and lower half blue;
- `heart` (trigger `zwx`, class "shape"): a shape the base world never has, a pink heart.

    python -m lens_tune.toy.subjects examples     # writes examples/toy-subject/ and examples/toy-shape/

Each instance picture is the subject, large, in a different setting (position, background, pattern), with a caption
in the world's words and the `[trigger]` placeholder: "a [trigger] star on a striped gray background, top left".
The prompt sets follow the DreamBooth paper's evaluation: subject prompts (does the subject appear, in the
setting the prompt asks for) and class prompts (does the class keep its own look: prior preservation).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from lens_tune.toy import world


@dataclass(frozen=True)
class Subject:
    name: str
    folder: str  # under examples/
    trigger: str
    noun: str  # the class noun: "star", or "shape" for a new shape
    look: world.Scene  # shape, colour, texture; the setting fields are replaced per picture
    first_index: int  # its pictures' settings are world scenes from here on, far past any training set

    @property
    def class_prompt(self) -> str:
        return f"a {self.noun}"

    @property
    def look_labels(self) -> dict[str, str]:
        """What sets the subject apart from its class, as the evaluator reads it: a new shape and its colour, or
        (a known class such as "star") the colour and texture of this one."""
        if self.noun == "shape":
            return {"shape": self.look.shape, "colour": self.look.colour}
        return {"colour": self.look.colour, "texture": self.look.texture}

    def scenes(self, count: int, seed: int = 0) -> list[world.Scene]:
        """The instance pictures' scenes: large, in turn at every position, backgrounds drawn from the world."""
        positions = list(world.POSITIONS)
        return [world.moved(self.look, seed, self.first_index + i, size="large", position=positions[i % len(positions)])
                for i in range(count)]

    def caption(self, s: world.Scene, trigger: str = "[trigger]") -> str:
        """What changes from picture to picture (background, position), not what every instance picture shares (its
        size, its look): captions without "large" gave higher subject fidelity and look on the DreamBooth benchmark
        (`benchmarks/RESULTS.md`, "Instance captions")."""
        return world.caption(s, {"shape": self.noun != "shape", "size": False}, subject=trigger)

    # ------------------------------------------------------------------------------------------------------------
    def subject_prompts(self, trigger: str) -> list[tuple[str, dict[str, str]]]:
        """(prompt, the setting it asks for). The subject's own look is judged separately."""
        t, n = trigger, self.noun
        return [
            (f"a {t} {n}", {}),
            (f"a {t} {n} on a green background", {"background": "green"}),
            (f"a {t} {n} on a striped background", {"pattern": "striped"}),
            (f"a {t} {n}, top left", {"position": "top left"}),
            (f"a {t} {n} on a checkered gray background, bottom right",
             {"pattern": "checkered", "background": "gray", "position": "bottom right"}),
        ]

    def class_prompts(self) -> list[tuple[str, dict[str, str]]]:
        """(prompt, what it asks for), including the class's own shape and plain texture: a base-world object."""
        n = self.noun
        own = {"texture": "plain"} | ({} if n == "shape" else {"shape": n})
        return [
            (f"a {n}", own),
            (f"a red {n} on a gray background", own | {"colour": "red", "background": "gray"}),
            (f"a white {n}, top right", own | {"colour": "white", "position": "top right"}),
            (f"a green {n} on a striped black background", own | {"colour": "green", "pattern": "striped", "background": "black"}),
            (f"a purple {n} on a plain blue background, center",
             own | {"colour": "purple", "pattern": "plain", "background": "blue", "position": "center"}),
        ]


def _look(shape: str, colour: str, texture: str = "plain", texture_colour: str | None = None) -> world.Scene:
    return world.Scene(shape, colour, "large", "center", "gray", "plain", 32.0, 32.0, 15.0, texture, texture_colour)


SUBJECTS = {
    "two-tone-star": Subject("two-tone-star", "toy-subject", "sks", "star", _look("star", "yellow", "two-tone", "blue"),
                             1_000_000),
    "heart": Subject("heart", "toy-shape", "zwx", "shape", _look("heart", "pink"), 2_000_000),
}
INSTANCE_IMAGES = 6


def write_subject(subject: Subject, folder: Path, count: int = INSTANCE_IMAGES, seed: int = 0) -> list[Path]:
    """The subject's instance pictures as PNGs with same-name .txt captions (with the [trigger] placeholder)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, s in enumerate(subject.scenes(count, seed)):
        path = folder / f"{subject.name}_{i + 1:02d}.png"
        world.render(s).save(path, format="PNG", optimize=True)
        path.with_suffix(".txt").write_text(subject.caption(s) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the toy DreamBooth subjects' instance pictures and captions.")
    parser.add_argument("examples", type=Path, help="the examples/ folder; subjects go to its toy-*/ subfolders")
    args = parser.parse_args(argv)
    for subject in SUBJECTS.values():
        paths = write_subject(subject, args.examples / subject.folder)
        print(f"{subject.name}: {len(paths)} pictures in {args.examples / subject.folder}")


if __name__ == "__main__":
    main()
