"""A synthetic language in which early tokens matter: a hidden Markov model with a persistent hidden mode.

Each sequence first draws one of ``modes`` hidden modes, then walks a mode-specific Markov chain over
``states`` local states, each emitting a token. Some tokens are shared by all modes, so a reader must infer
the mode from the prefix, and a continuation that contradicts its prefix becomes improbable (tokens private to
another mode have probability ``noise / vocab``): supervision on a
drifted prefix is about a different language than the one the prompt set up. Exact log-probabilities of any
token sequence come from the forward algorithm.
"""

from __future__ import annotations

import torch


class HiddenModeLanguage:
    def __init__(self, vocab: int = 32, modes: int = 4, states: int = 6, shared_tokens: int = 8,
                 concentration: float = 0.3, noise: float = 0.02, seed: int = 0):
        self.vocab, self.modes, self.states = vocab, modes, states
        S = modes * states
        private = (vocab - shared_tokens) // modes
        transition = torch.zeros(S, S)
        emission = torch.zeros(S, vocab)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in range(modes):
                block = slice(m * states, (m + 1) * states)
                # Transitions stay inside the mode (block-diagonal) and are sparse within it.
                transition[block, block] = torch.distributions.Dirichlet(torch.full((states,), concentration)).sample(
                    (states,))
                # Emissions mix the shared tokens with tokens private to the mode.
                support = list(range(shared_tokens)) + list(range(shared_tokens + m * private,
                                                                  shared_tokens + (m + 1) * private))
                emission[block, support] = torch.distributions.Dirichlet(
                    torch.full((len(support),), concentration)).sample((states,))
        # A little noise on every token: an off-mode token is improbable (about log(noise / V)), not impossible,
        # so log-likelihoods of imperfect samples stay finite and comparable.
        emission = (1 - noise) * emission + noise / vocab
        self._transition, self._emission = transition, emission
        self._initial = torch.full((S,), 1.0 / S)
        self.log_transition = transition.clamp_min(1e-30).log()
        self.log_emission = emission.clamp_min(1e-30).log()
        self.log_initial = self._initial.log()

    def sample(self, batch: int, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[batch, length] token sequences."""
        state = torch.multinomial(self._initial.expand(batch, -1), 1, generator=generator).squeeze(1)
        tokens = torch.empty(batch, length, dtype=torch.long)
        for t in range(length):
            tokens[:, t] = torch.multinomial(self._emission[state], 1, generator=generator).squeeze(1)
            state = torch.multinomial(self._transition[state], 1, generator=generator).squeeze(1)
        return tokens

    def log_prob_prefixes(self, tokens: torch.Tensor) -> torch.Tensor:
        """[batch, length]: log p(x_1..x_t) for every t, by the forward algorithm in log space."""
        tokens = tokens.cpu()
        alpha = self.log_initial + self.log_emission[:, tokens[:, 0]].T  # [batch, S]
        out = [torch.logsumexp(alpha, dim=1)]
        for t in range(1, tokens.shape[1]):
            alpha = torch.logsumexp(alpha.unsqueeze(2) + self.log_transition, dim=1)
            alpha = alpha + self.log_emission[:, tokens[:, t]].T
            out.append(torch.logsumexp(alpha, dim=1))
        return torch.stack(out, dim=1)

    def continuation_log_likelihood(self, tokens: torch.Tensor, prompt_length: int) -> torch.Tensor:
        """Per sequence, mean log p(x_t | x_<t) over the continuation (t >= prompt_length), nats per token."""
        prefix = self.log_prob_prefixes(tokens)
        return (prefix[:, -1] - prefix[:, prompt_length - 1]) / (tokens.shape[1] - prompt_length)
