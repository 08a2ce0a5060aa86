"""Generation with a trained character: storyboards (story -> scenes -> validated frames) and
image-to-video clips (LTX-Video) with fidelity, expression-dynamics, motion, time and cost checks.

Modules:

- :mod:`runner.generate.planner`  story -> scene list (``manual``, ``rules``, ``llm`` planners)
- :mod:`runner.generate.frames`   batched frames with validation against the character, retries
- :mod:`runner.generate.guided`   reference-guided mode: IP-Adapter + ControlNet via diffusers loaders
- :mod:`runner.generate.ltx`      LTX-Video image-to-video wrapper (+ ``builtin:tiny-ltx``)
- :mod:`runner.generate.measures` fidelity (0-100 distance), expression dynamics, motion magnitude
- :mod:`runner.generate.budget`   wall time and cost per step against targets

Heavy libraries (torch, diffusers, cv2, av) are imported inside functions, so that planning
(``runner plan``) stays light.
"""
