"""Public datasets: a pinned registry, a verified fetch-and-cache, and typed loaders.

Every file dpnle reads from a public source is named here by (owner, repo, commit, path, sha256).
``fetch`` puts it in the user cache, either by downloading
``https://raw.githubusercontent.com/<owner>/<repo>/<commit>/<path>`` or, when ``DPNLE_DATA_MIRROR``
is set, by copying ``$DPNLE_DATA_MIRROR/<owner>/<repo>/<commit>/<path>`` from an offline mirror.
Either way the bytes must hash to the pinned SHA-256 before they land in the cache, so a loader
never sees a file that differs from the one the results were produced with.

Loaders return lists of frozen dataclasses with stable ids, and check the counts the rest of the
pipeline relies on, so that a changed or truncated source fails loudly instead of silently.
"""

from __future__ import annotations

import bz2
import csv
import difflib
import hashlib
import json
import os
import random
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dpnle.concepts import TRAITS, VALUES, get_concept
from dpnle.errors import DpnleError
from dpnle.paths import datasets_cache_dir

MIRROR_ENV = "DPNLE_DATA_MIRROR"
DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK_BYTES = 1 << 20


# --------------------------------------------------------------------------------------------
# Errors


class DatasetError(RuntimeError, DpnleError):
    """Base class for everything that can go wrong getting or reading a public dataset."""


class UnknownDatasetError(DatasetError, ValueError):
    pass


class DatasetHashError(DatasetError):
    pass


class DatasetUnavailableError(DatasetError):
    pass


class DatasetFormatError(DatasetError):
    """A pinned file parsed, but does not hold what dpnle expects (counts, columns, labels)."""


class UnpinnedDatasetWarning(UserWarning):
    pass


# --------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class DatasetFile:
    name: str
    owner: str
    repo: str
    commit: str
    path: str
    sha256: str | None
    bytes: int | None
    licence: str
    citation: str
    use: str
    # False only for files that are not in the offline mirror (``--all`` skips them; a fetch
    # downloads them from the pinned commit): their SHA-256 and size were never seen here.
    verifiable: bool = True
    # The file's git blob id (SHA-1 of "blob <size>\0" + bytes) at ``commit``, for a file whose
    # SHA-256 is unknown because its bytes were not available when it was pinned: a fetch checks
    # it instead. The PersonalityBench search files (LFS-sized, absent from every snapshot at hand).
    git_blob: str | None = None

    @property
    def source(self) -> str:
        return f"{self.owner}/{self.repo}@{self.commit[:7]}"


@dataclass(frozen=True)
class _Repo:
    owner: str
    repo: str
    commit: str


_ALHEIMSINS = _Repo("Alheimsins", "b5-johnson-120-ipip-neo-pi-r", "493546d48eb9053aca7e6c55574f4bf8033cc5a4")
_MPI = _Repo("jianggy", "MPI", "0f44b56223d4a4308fdf69276a69d7ae053478c5")
_PALIGN = _Repo("zhu-minjun", "PAlign", "18e1e3404951acc864f30f323a0e47a0840b474a")
_DPNLE = _Repo("Z1ivan", "DPN-LE", "3fb5e7273cae73aea3bef6c084178940726c2fb8")
_NPTI = _Repo("RUCAIBox", "NPTI", "630d2a236e5c8d2484fbd5b71249aedd1fc44195")
# NPTI/dataset/search/<Trait>.json at that commit: git blob ids read from the commit's tree (the
# same blobs sit at data/personalitybench/search/ in DPN-LE @3fb5e72). The bytes themselves were
# absent from the snapshots at hand, so no SHA-256 / size could be computed: fetch checks these.
_PB_SEARCH_BLOBS: dict[str, str] = {
    "agreeableness": "0a7774d7209fc1bc7ad9b5e676d10bb159ae6642",
    "conscientiousness": "c9d8bd6191cff9e918244a1e520a4bd83531519a",
    "extraversion": "f425b330ff81171037f988ceb2da6455ef0e79c1",
    "neuroticism": "eac0228380b546e0b3b4da5bd85b231716612e8b",
    "openness": "a53f3b04ef4337243cea226d9820ad20bfa8961b",
}
_ANTHROPIC_EVALS = _Repo("anthropics", "evals", "84fcc677e52e1902d696c32cd1a6b663e70d3993")
_TOUCHE = _Repo("ShahrzadAzari", "Human_Value_Detection", "209dfa3edbb4d835f02dab5584911f8d47f5d020")
_VALUEBENCH = _Repo("Value4AI", "ValueBench", "188773443c1f2f24ff3223e46216bd74ed91ae51")
_GSM8K = _Repo("openai", "grade-school-math", "3101c7d5072418e28b9008a6636bde82a006892c")
_MMLU = _Repo("hendrycks", "test", "785eba57b455b9f9be12a0d3c1106d67274fea0e")
_ARC = _Repo("zhouqb", "order_dependency_problem", "c78952c019f7b3fe3c2c14a1dfc7eaeed2efee48")
_HELLASWAG = _Repo("klosax", "hellaswag_text_data", "1105d370f8340eac3c63a91fd1fa58e8999f9505")
_TRUTHFULQA = _Repo("koppula", "TruthfulQA", "d71c110897f5d31c5d7f309e7bc316c152f6f031")

_IPIP_LICENCE = "MIT (repository); IPIP items are public domain"
_PERSONALITYBENCH_LICENCE = (
    "MIT (redistributed by DPN-LE); originally NPTI, which has no licence file: cite NPTI"
)

_CITE_IPIP120 = (
    "Johnson, J. A. (2014). Measuring thirty facets of the Five Factor Model with a 120-item public "
    "domain inventory: Development of the IPIP-NEO-120. Journal of Research in Personality, 51, 78-89."
)
_CITE_MPI = (
    "Jiang, G., Xu, M., Zhu, S.-C., Han, W., Zhang, C., & Zhu, Y. (2023). Evaluating and Inducing "
    "Personality in Pre-trained Language Models. NeurIPS 2023."
)
_CITE_PALIGN = (
    "Zhu, M., Weng, Y., Yang, L., & Zhang, Y. (2025). Personality Alignment of Large Language Models. "
    "ICLR 2025. Items: Goldberg, L. R. (1999). A broad-bandwidth, public domain, personality inventory "
    "measuring the lower-level facets of several five-factor models."
)
_CITE_NPTI = (
    "Deng, J., Tang, T., Yin, Y., Yang, W., Zhao, W. X., & Wen, J.-R. (2025). Neuron-based Personality "
    "Trait Induction in Large Language Models (NPTI; PersonalityBench). ICLR 2025. "
    "Files as redistributed by DPN-LE (github.com/Z1ivan/DPN-LE)."
)
_CITE_HOTPOTQA = (
    "Yang, Z., Qi, P., Zhang, S., Bengio, Y., Cohen, W. W., Salakhutdinov, R., & Manning, C. D. (2018). "
    "HotpotQA: A Dataset for Diverse, Explainable Multi-hop Question Answering. EMNLP 2018."
)
_CITE_ANTHROPIC = (
    "Perez, E., et al. (2023). Discovering Language Model Behaviors with Model-Written Evaluations. "
    "Findings of ACL 2023."
)
_CITE_TOUCHE = (
    "Mirzakhmedova, N., et al. (2024). The Touche23-ValueEval Dataset for Identifying Human Values behind "
    "Arguments. LREC-COLING 2024. Kiesel, J., et al. (2022). Identifying the Human Values behind "
    "Arguments. ACL 2022."
)
_CITE_VALUEBENCH = (
    "Ren, Y., et al. (2024). ValueBench: Towards Comprehensively Evaluating Value Orientations and "
    "Understanding of Large Language Models. ACL 2024. PVQ-40: Schwartz, S. H., et al. (2001). Extending "
    "the cross-cultural validity of the theory of basic human values with a different method of "
    "measurement. Journal of Cross-Cultural Psychology, 32(5), 519-542."
)
_CITE_GSM8K = "Cobbe, K., et al. (2021). Training Verifiers to Solve Math Word Problems. arXiv:2110.14168."
_CITE_MMLU = (
    "Hendrycks, D., Burns, C., Basart, S., Zou, A., Mazeika, M., Song, D., & Steinhardt, J. (2021). "
    "Measuring Massive Multitask Language Understanding. ICLR 2021."
)
_CITE_ARC = (
    "Clark, P., et al. (2018). Think you have Solved Question Answering? Try ARC, the AI2 Reasoning "
    "Challenge. arXiv:1803.05457."
)
_CITE_HELLASWAG = (
    "Zellers, R., Holtzman, A., Bisk, Y., Farhadi, A., & Choi, Y. (2019). HellaSwag: Can a Machine Really "
    "Finish Your Sentence? ACL 2019."
)
_CITE_TRUTHFULQA = (
    "Lin, S., Hilton, J., & Evans, O. (2022). TruthfulQA: Measuring How Models Mimic Human Falsehoods. "
    "ACL 2022."
)


def _pinned(
    name: str,
    repo: _Repo,
    path: str,
    sha256: str | None,
    nbytes: int | None,
    licence: str,
    citation: str,
    use: str,
    verifiable: bool = True,
    git_blob: str | None = None,
) -> DatasetFile:
    return DatasetFile(
        git_blob=git_blob,
        name=name,
        owner=repo.owner,
        repo=repo.repo,
        commit=repo.commit,
        path=path,
        sha256=sha256,
        bytes=nbytes,
        licence=licence,
        citation=citation,
        use=use,
        verifiable=verifiable,
    )


# fmt: off
# Registry data is laid out as tables, one file per line, to keep it easy to audit against a manifest.
# (subject, test sha256, test bytes, dev sha256, dev bytes) of the Sept 2020 MMLU release.
_MMLU_FILES: tuple[tuple[str, str, int, str, int], ...] = (
    ("abstract_algebra", "4be89c0fb1d2419722e88880f6da3da95750367185ecd36f6492a6f74785cf64", 17358, "bd8c73f3c75bea9db82d281d9da6949cea687b987dba24a142c638e758046624", 719),
    ("anatomy", "966dfd5c4579885ebdb8c05d6754ae5834f672632586d8595be3c0f9360e6f4e", 29844, "0985685cf5ab13ccc1629f03a1308a9add8767582ffeb195b68b18c3415c9993", 830),
    ("astronomy", "87c9c3cb5a55395c70dd9ed521dd7d2629fd4ff236c5ab647102e007f52a9341", 42999, "bb03eca519a3fbc04017dc4783635763ac928f0811ce6243dbcbf0d526dbe1e3", 1943),
    ("business_ethics", "cd3fc3a85a34cb17e6c5b2fb68ea61e7800b31120d92934019f1e17f4832fbd4", 31394, "7cd487e4ba7d9fe423bcc259ad852e963dc370629b8d61881b61ed0ae84c0b46", 2095),
    ("clinical_knowledge", "d7c23fd4e75d0a99f042a5d55221ba8465ffc9c9042bc4c30bb07f45d2199dac", 56224, "a82e8b10da8168f8fe9f7315165e6e87a4b3bebe91f6445b9aafbefb162cc531", 1029),
    ("college_biology", "e1204cb9d19887ea266145f038b5d4cc1fbc33d7efce186259c4ecca1cbe3119", 45351, "31f4ae0707ba3f742e0d5546ff970949be8a05e217921fe87b1814d6a0ab8184", 1403),
    ("college_chemistry", "4d61d7887f845b887c52ac928b6dffdcf2468d79f3d0fbb4d1731092a51d2552", 22314, "9ba27ba571b8ad40d35a2a88a60acf434ca5f37962c2eba8f9d0aa89edb4c1c7", 1200),
    ("college_computer_science", "d53a1d0d1c4362dacf92a4ff1d6a755beb5a87f24a7301c3c4391fcacc6530b4", 40401, "fc1a43187cd68390d663e0a1849688b13a4cd75ab17616558f4e584a4a8ae2bd", 2638),
    ("college_mathematics", "8b5bef14d4209c7918eaf947e4f12a5ae9470567722d8ba9761302d733e8ac71", 22429, "27731ee1402e720ee01ad6fa6a969a0d0978a0e9b4c385d328a61869a43f321f", 1366),
    ("college_medicine", "9c533cfff89edaa317b2e79bbabcdd5e2e522e019679cb4a6475e5f2a1861b1e", 78334, "63928a944fda769d7e52a3a4549d4f37f094896e65e7db35029261e1ae79909b", 1545),
    ("college_physics", "079c3696eda22c13b0472de245c7bb4918315b59481964109a4f65d2a35b4243", 27811, "6e043d6c566091c5ad1d8bc1d002900e1aa0bff114f98d5e3f2e4f645efce100", 1279),
    ("computer_security", "8e40f809858db9dd8585036b53984e570b6101f72be2214b85e979c7fafa307f", 24840, "09e276300dbd2d07906dbe4ff82aabf45b9765f933eb7d0f35ea3ea97dee8020", 974),
    ("conceptual_physics", "7b39a241bb20424fd2a4e0e37ce05d94865ffc44191d8be4063be0e973312256", 34992, "5e65be1f6fdd82f4887e3747af790a747191b1b732dd2bea76306388d5ee3719", 799),
    ("econometrics", "10eb6b2d3a519a463872ef75902991b51ebf45865b29888e86d40228ace24029", 44039, "7a01a925199c246decd0f1fc7a1b8dc28136b19d793e5b1e0d97142c118a2940", 1521),
    ("electrical_engineering", "8b0d747a97cb2cbbd8926c8deb2cda6073da6d5d3cc099693aa7761be938f5e4", 21595, "5aad11b1d1c8dc1a431c3e79a047cba56d691a60403ddffaf5fbd45e9c82bc0d", 851),
    ("elementary_mathematics", "50aca74e92c6ffa50ada650f9b14af333490ea7c6649c73ccde48b78051dc27c", 61126, "9aca9cd215b7c170020fd5f7db1c9c3d5cbf6df9ee7b970a4810649a87245011", 1315),
    ("formal_logic", "bc2dc7373a664ae72e166dcbe3f7aaf1bb65b99f106f1831f335c53467f35248", 46929, "e4b579358ed4878f6c91bfea0ccc51efdd15a28401f86da9ee8f6c0af37cf36d", 1628),
    ("global_facts", "84d6bcd165fba01327a8c5503239da9a00b7bd8a1b48db61d5774de29ee823aa", 15970, "8090f53567366b64ee6d23b6f73753421ea6d38780e0e3ca3f856bfa76031c86", 1095),
    ("high_school_biology", "cfaba2b58b9714d2a6983a90bce17f14cc44cfc8195b20f8f65fef70d21331b9", 102424, "6a200085c150794846d4bab43bb0e22ceec9f99576dfc25f5c5d8faa9595ae13", 1538),
    ("high_school_chemistry", "15171de0d3bb730b348736625e34d564c34ff7d790a77e93f9bcd8d332ab63d5", 53944, "1ba44aeea98ca22342b6525a3a9ebb62003b2a8289fa42d7c844e2139557ec5b", 1091),
    ("high_school_computer_science", "c203732c6ea575e14ef54d6fbc91a5fe87b958c6a6e0b035038e6c65baff6e88", 42396, "5de3800dfbbfaa89050413a765deaf774fdb0611e370951383fb50fac774663e", 2809),
    ("high_school_european_history", "09983655452c3c40ba466050ec82252f02a235e5946734f4d73b73688fc9509b", 266888, "a3677065cf51abc32901cdcf88ed64121f5595e3a5a67f86ae2570f866fe87c5", 11445),
    ("high_school_geography", "b59382702daeb29a5ff8e255d5a22a33775c79859defd089a1cd835e0949b3af", 38280, "e43fc27b9fa8b808773a2871007b39e012a1cc1ec902f85d85cc9c27cc12883d", 1268),
    ("high_school_government_and_politics", "fbd7a89eb2c7806097e18b40950e44e0580e6f97cd151f01a216bb575c2d7903", 61553, "daf013a3eae04b5904e6a706cf0574df2c881e00d46a979cb34c6e2968ad1c90", 1648),
    ("high_school_macroeconomics", "e60b488a00f908bed94e5ed46638506a203bab0763fc22d20a3bbf0d939f5d02", 108097, "23ed995071c47e627c4e6adbce63a9144920441abb7e69f8b4dfac5fdc4e402d", 1191),
    ("high_school_mathematics", "fe8f7a154834bba30947401ba37ea6c7afdcfba82ddc341c79b5d3016991d290", 48584, "d7401d5cbad5ae697bfa480e35d85de8ebf1232589a3c59b010782ee49cbe18c", 1168),
    ("high_school_microeconomics", "a250cc4976654e479cecdb7b66046ce2412df3e5e1b9c3d145ed344eae9a2256", 70131, "a409b422561f1fb02e6d1bc044657cfff7779b13146edfd937d2573423c2c49b", 1167),
    ("high_school_physics", "a217233b6c1f1aa703d3d1535de8eec218a55e5c1aee21d89ee9046a81fb9ff0", 56855, "d54598276e1761c8c849eda3e8ba6cb3eb0785b7944c5921af12a3af32bcf78d", 1307),
    ("high_school_psychology", "88c33b6b0ade567d07b8b5b074effdb52f31d773541fd71e86cb0d85a8daf7bf", 146542, "cb1ae2b20c2a43f68e0c6cd6ec208c8cbbbefaee931f5f0dba1b7f4dda5e6482", 1781),
    ("high_school_statistics", "d62843d2fd084d6af1c8a0a6491d0aa642c34a7a68476605b9b3db5841e63d3f", 105978, "5103d34343f7749a578a0f1a6b20bceb999ed07de27432f1a89d79161eadde22", 2381),
    ("high_school_us_history", "0338dea3b11881be53c2208ae8dbb571c792c0dca6f0b36a352147c0be81625e", 292834, "028b3c81c7be1138ad50b4afa1835773788e4557426a40abfaf132b11edab541", 8758),
    ("high_school_world_history", "7787343ae18e4e1ef833c8630c0c914c62f42c2f35d8b90f4bec2eecccfc161e", 373770, "b6e87a14718b0415241dfe10dd86605de5b6e5995fa57580e9e2d7c56fe147a1", 4771),
    ("human_aging", "01299d7e0ae4a8d082daeecc140445ce7393b464040bd810b0a60a370ae5502e", 40617, "c2667f1f98c7e63a0693d9a1bf09065d21b9e499087d396aeca0fafebbf752d2", 863),
    ("human_sexuality", "befe44cd6db2b4c759acce66dfcbbc5e959bbbcfc8aca0096bb09549653c06c8", 29792, "0da7f8f7aeb6d5a08f0413489aa5d5b84ff8ac971952ea66242762f779cb6794", 942),
    ("international_law", "51b3a6d74cc84651b2355d2823c30d993015ddfe8ef39725da4e0442f29489fc", 50691, "6f7f1c0191c0bcfe195d0ed39942a605012967a04d855c6482dc7e7a9f95e4d8", 2293),
    ("jurisprudence", "bf7a770aebfbdb181abc2c26ffd7a01ab31f93c7e2dfe6924c57c7bca4a0dff6", 31375, "27533d974102031088bc5c47fc008538ab3d08ca75e127fb64ff04cdd1562da2", 1172),
    ("logical_fallacies", "3fe8b48c74832525556455d49960cc0c3cff37496783348043ff69a1863c2244", 46290, "4de026c2d116c381dcc1b65e91a28ba3d124398f920b0f3904ec5b641deb28f4", 1444),
    ("machine_learning", "b579bd7dfc9319cd8810a723c8e662afbab810fe64d775fc57ec24cfb55b3af1", 27990, "7870177516ff1958ca6f8eaec855c74b14078eafde8c0c5480c7f9eb7f3b8551", 2074),
    ("management", "4a535a11bb480a09a302e86d157ae2d33e054cfa00e4265fe300a9408b87ec6b", 17457, "f75224958ab245d86c335d6886f8689247a9f83691ad63bb7ef3196641be9e52", 761),
    ("marketing", "ecf0ae0ae906194d033ca7d7746eaf201232eccb78ee24147e737473f751233d", 57435, "15b3cf450ebc11e122886a5bad41e78260228259fa184eaa4ba566bdf37f0315", 1354),
    ("medical_genetics", "4cf70b253e326ee5bcff6e14091765c64003c0d853a58dbc6a5737281356766d", 18414, "70cd9ff940bef360693eeb4e05b5b8e53ad75a81d6b74a784222d4cae6dcb896", 952),
    ("miscellaneous", "f850dd48e37a545cef57741206598de71e2b2f6b008c8c7a51a4530987ae3ee7", 129093, "72f74676c37fe477720d8b55e84517bd21daf1fe24f99dd33f1b0a636d31782e", 562),
    ("moral_disputes", "673f5e9054f55fc5e165a3ed01e1b13eb1ee5a3405055818b50532e05de9bfdd", 99902, "b3eddc16d4328c766b5d8aea52b8bae2fdcd64ed2f307a5c758790f84fcf3453", 1637),
    ("moral_scenarios", "39599417ee0e5eabaca8c4686afc9ba7d0e34f858bce580caa59ee34b264af0a", 305813, "1c04ba888a302e9526147d85415979f818683d7551dbef609f6e7fc8aadb43ca", 1667),
    ("nutrition", "b5ef9739b7846733797f73f2cc67715d41160719e8846e0d529a61f2d6d659d0", 85612, "6c51e76e5adbbdf1c42e9af9c1af025e82d5682957a7c726976e695b79234110", 1866),
    ("philosophy", "a0f0c6fc9e4f08c04ff3a339996c4ed688a9fbe75d205fff4b9d3549fb49fa1e", 72820, "587be220837bbe089702aa27cda03fbf72a7b959a9a4425e70d598026614cf11", 859),
    ("prehistory", "8d44938332ea3d199cfa51a18ef69af972aa33ca4af7b5f5bc62e768a31f949a", 82193, "b20f0b1823fe00e7e2ee9f7378be8cb612a61a0d7bf0c97dad0f4201e495bf3b", 1742),
    ("professional_accounting", "a0960b00b979aec320d8e74e1492683df5709000decc4752a67792fe66f8478a", 118249, "efc070ed71676829c67497542e3571f50a868036a17f93d00a56a4f85767ae0d", 2041),
    ("professional_law", "1bb6dd95b4b6480ca815ee31102e9636fc5634062d27cefb48ca2b1d382abce8", 1868779, "15d8589900ccf4725e1bad17837d48cc18c8bf033cd9b5d6bacf28a2a8f1064f", 6503),
    ("professional_medicine", "d6cb72e2238d5a3885ee28c6194bf62fff9c2799f9aabeac8aec3b89f122d438", 217493, "486456d578890d4700dd8044ac236c8ac2ee3389e35fc81ac37529f4f4487785", 3678),
    ("professional_psychology", "322b8268bf89d9bac278120a0a11e5992b329797b4afe3d76bdd4fb847a94b31", 217475, "222e690db42dfb217a7c56a6ac693b73cf0168e344d75f28618c62ad9d2c0261", 2148),
    ("public_relations", "836cceb16b257c344e11f7ebee4e889284273eda5e0c6bdcb124cffa9dbb0673", 26585, "8895f665f4c696ae76d34210546d0ab4b21b79d2fd8534cd2e8002e8ed0969dc", 1363),
    ("security_studies", "ab7634702670ee0d5e98b852f5bcfad2821ff9a2e909d223de05422c948f6638", 199745, "007576f989b0badbf87423a444433099ee98438380e8a41c141d51c85d5abccf", 5215),
    ("sociology", "f6c464600032aa2bb53294ad53217fbb650601eee206af947b3ce4c587ff5bed", 61540, "2e2bb34b4cabdc50e2c43097d1cfe91560224f9e1224adc19a01e922d1c49414", 1484),
    ("us_foreign_policy", "2821ee009a2b1b7d4adc5a212a0bad7fe05d377455de0fe0841beab8f00142e1", 26047, "3a9677a89fd67c3a891671a2a6a14ff69ab37bdd54fb687c2f8334c8a3fa1543", 1480),
    ("virology", "4355b9d79142da0e44a767a495a277733fd89ad67236cbbe3f42ff3a6d46b483", 34689, "2a95551a16fc9538d98e1c79ab0ba53c40562158e6d05e9c42f7fdbeae8379bd", 960),
    ("world_religions", "3be96b2465419289c4fe0c8a0d003003facd243c8982c6daafc6ac90a40bd507", 21156, "985f2091ed0cf0340b4a191ce941bc7b1bef6f0614b852eb4cbc0dd236ae95f3", 538),
)

MMLU_SUBJECTS: tuple[str, ...] = tuple(row[0] for row in _MMLU_FILES)

_PB_TEST_FILES: dict[str, tuple[str, int]] = {
    "openness": ("2018cfdfbac763d0c921b1da7197f152c850e5d78be3f9de86af2ba6243d0acd", 20562),
    "conscientiousness": ("8980a9272a5da4c1a741df3787c0e328e365e0ea5aa55cf56d9f29e0054ec5d6", 19256),
    "extraversion": ("ff8cce6c9cf5c6f0cbb2d5c6551eaa6294bc4c2384ded2b8460392cf54dae267", 19146),
    "agreeableness": ("160dde7ef40affc8809dee381265a50ca01ffde968aa9f24212c7a08be31858a", 19545),
    "neuroticism": ("e370b3446fd7e92069039b0105bec9123e770f39b4fee29574116401e6d5b798", 19813),
}

_ANTHROPIC_PERSONA_FILES: dict[str, tuple[str, int]] = {
    "openness": ("07e3a5d29e62a27806f75bc7b015d8d9c4120edbda7e593884e036a2d32ffa7b", 330776),
    "conscientiousness": ("fd05517c0a453a7b47d19964ac6528db394c8cd00a5f74cc11d91479a20b90a6", 318633),
    "extraversion": ("6734dc0bc84bc5929017eef6209cb9152c4e5fe4b744c7d11af8cb9749687576", 302288),
    "agreeableness": ("8caa0fa07946370fb4ec38dd82eda7d3a86591c1dc701d2e645ae33c3239f5ce", 307954),
    "neuroticism": ("b2b0f426449517ed9a2d1d2b635bbc13efc0815ff2cfa361b7fbc1044d284d6a", 295734),
}

# NPTI's published neuron lists for Llama-3-8B-Instruct (RUCAIBox/NPTI @630d2a2,
# NPTI/neuron_results/<Trait>[_reversed]_dict.json): trait -> ((sha256, bytes) of the HIGH list,
# (sha256, bytes) of the _reversed (LOW) list). Openness's two files are absent from the offline
# mirror, so their bytes could not be pinned: dpnle import-npti takes them from --dir.
_NPTI_LIST_FILES: dict[str, tuple[tuple[str, int], tuple[str, int]]] = {
    "agreeableness": (("69908f6ad7dff6ddfaea2eb772f0e78ec3c66e111f53f73bf9740b5a400e629b", 3174486),
                      ("2b503a57d85c852786383425189eca54ba0fba7c42a6be21a143024bfa455bf3", 3182535)),
    "conscientiousness": (("c950ed3fe97c34c846606824ee80a5e879ca55e4af23c0c2db8612d6beba1293", 1554487),
                          ("fa18348863a242f00bdbb05c1f4c46fbfaa76f31beabc0bfe0b03f28e3144311", 2565283)),
    "extraversion": (("ab974b14bb33665c7b5b22ddd5ee2a9f6c64a1c3c04da220bd2b2750ac7faae6", 4143930),
                     ("3eaee39415448bdf52d3ab0bd321956c7f06846883b3d77bb2af6ec7a27b6c2f", 3704463)),
    "neuroticism": (("9748d6e9646130ca2b6d876670eeed6f255c55720998dbde508c2a0b04490c9c", 2900859),
                    ("15819c979102ae6c3a7b76615c45d7a92d610c06fcd3177011cc914710be3d8f", 2464203)),
}


def npti_list_names(trait: str) -> tuple[str, str] | None:
    """Registry names of NPTI's published (HIGH, reversed) neuron lists for ``trait``; None when
    dpnle has no pinned copy (Openness)."""
    trait = trait.strip().lower()
    return (f"npti-neurons-{trait}", f"npti-neurons-{trait}-reversed") if trait in _NPTI_LIST_FILES else None


TOUCHE_SPLITS: tuple[str, ...] = ("training", "validation", "test")

_TOUCHE_FILES: dict[str, tuple[tuple[str, int], tuple[str, int]]] = {
    # split: ((arguments sha256, bytes), (labels sha256, bytes))
    "training": (
        ("322f06c43e2cb0f061f865dc8e6ce9805515cccb5ec18c0bca7fc3462fa0453c", 1012498),
        ("87ee3c0fe6760f2a6f895ed9144ad0ed076a9a5ff543820b9683aad8fd46bf12", 253843),
    ),
    "validation": (
        ("706e987776cbd7c5929e47b669c7de91b01f08eace10c10bb1083fd3c4f6c8ee", 362608),
        ("383b1dbbacfdcc7948e29619391a00f177b7708f85eb8ab1808972a76fc201b5", 89484),
    ),
    "test": (
        ("dc1a1a214ceb60042d100197fdaaee826b3f33f6cbe864bab23169c1b7d65c76", 290185),
        ("2e1886973652c6f657f746c94de77b98381bdc8a0a53bf0e0448a7a4a1df7b2b", 74444),
    ),
}


def _build_registry() -> dict[str, DatasetFile]:
    entries: list[DatasetFile] = [
        _pinned(
            "ipip120", _ALHEIMSINS, "data/en/questions.json",
            "a2c3eb00be6292454519aa6b84e04c0e67cae7195323faf79cefb6f6d1c8af1c", 18689,
            _IPIP_LICENCE, _CITE_IPIP120, "IPIP-NEO-120 questionnaire (domain, facet, key per item)",
        ),
        _pinned(
            "mpi120", _MPI, "inventories/mpi_120.csv",
            "f20e591fc97779872a41c55c35bc8809e90b99d63312c0cc47420460157e63a8", 5429,
            _IPIP_LICENCE, _CITE_MPI, "MPI-120 questionnaire (the IPIP-NEO-120 items as worded by MPI)",
        ),
        _pinned(
            "ipip300", _PALIGN, "PAPI/mpi_300.csv",
            "a26d47a419117aa838fa720ebecd72d1c61f19fe58d96c5e4680666b027053a2", 14625,
            "IPIP items are public domain (IPIP_Permission.pdf in the repository)", _CITE_PALIGN,
            "IPIP-NEO-300 questionnaire",
        ),
        _pinned(
            "ipip300-split", _PALIGN, "PAPI/mpi_300_split.json",
            "85c761554504dd1b086de98e13fe84fb6e02915ad7bf2e234bb32428894a52c6", 1425,
            "IPIP items are public domain (IPIP_Permission.pdf in the repository)", _CITE_PALIGN,
            "DPN-LE's 120/180 split of the IPIP-NEO-300 (held-out items)",
        ),
        _pinned(
            "pb-descriptions", _DPNLE, "data/personalitybench/description.json",
            "4089d5865fac071c61e03f05fb8dc18cf33cf226c015e9452e5e957afe44eac7", 342869,
            _PERSONALITYBENCH_LICENCE, _CITE_NPTI, "PersonalityBench persona descriptions (80 high + 80 low per trait)",
        ),
        _pinned(
            "hotpotqa", _DPNLE, "data/general_capability/hotpotqa_validation.json",
            "62c8d8728a0978cf60b2bbf4bded634bf30d5c6d4b17cd126c7509f57487d750", 1887454,
            "CC BY-SA 4.0 (HotpotQA)", _CITE_HOTPOTQA, "capability: multi-hop QA",
        ),
        _pinned(
            "pvq", _VALUEBENCH, "data/value_orientation.csv",
            "cb81699e9ed621477d120246b3facd4d2943e880a93e19a68bdb4deaed9f6f11", 253569,
            "MIT (repository); PVQ items (c) S. H. Schwartz, academic research use", _CITE_VALUEBENCH,
            "PVQ-40 Schwartz value questionnaire (and the other ValueBench inventories)",
        ),
        _pinned(
            "touche-value-categories", _TOUCHE, "data/raw/initial/value-categories.json",
            "f2847738a5cf37f18f7428441f448242b3e969061aa9d8b03df5c9ba77e749bf", 10289,
            "CC BY-SA 4.0", _CITE_TOUCHE, "Touche23-ValueEval value taxonomy (20 categories)",
        ),
        _pinned(
            "gsm8k", _GSM8K, "grade_school_math/data/test.jsonl",
            "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14", 749738,
            "MIT", _CITE_GSM8K, "capability: grade-school math (test, 1,319)",
        ),
        _pinned(
            "arc-challenge-test", _ARC, "data/arc/ARC-Challenge-Test.jsonl",
            "edfac2380c22134a5f0cf78c61459ba76aa3299d7be0df0420cb1a340d3c2096", 484168,
            "CC BY-SA 4.0 (AI2)", _CITE_ARC, "capability: ARC-Challenge test",
        ),
        _pinned(
            "arc-challenge-dev", _ARC, "data/arc/ARC-Challenge-Dev.jsonl",
            "6606c063fc6c3b0a03fc298d0f31c0af72a615471a711316befbd99d746d926c", 124457,
            "CC BY-SA 4.0 (AI2)", _CITE_ARC, "capability: ARC-Challenge dev (few-shot examples)",
        ),
        _pinned(
            "hellaswag", _HELLASWAG, "hellaswag_val_full.txt.bz2",
            "50b637899e4263c2bc456c2dc726c95d2c8cd8e2a552ea5bd7719ce3cb03fe5b", 1964544,
            "MIT (rowanz/hellaswag)", _CITE_HELLASWAG, "capability: HellaSwag validation (10,042)",
        ),
        _pinned(
            "truthfulqa", _TRUTHFULQA, "data/v1/mc_task.json",
            "b3799639bc76c939836d587de7d30b48d91012cb34be04806d33106ce06c162a", 755456,
            "Apache-2.0", _CITE_TRUTHFULQA, "capability: TruthfulQA MC1/MC2 (817)",
        ),
    ]
    for trait in TRAITS:
        sha, nbytes = _PB_TEST_FILES[trait]
        entries.append(
            _pinned(
                f"pb-test-{trait}", _DPNLE, f"data/personalitybench/test/{trait.capitalize()}.json",
                sha, nbytes, _PERSONALITYBENCH_LICENCE, _CITE_NPTI,
                f"PersonalityBench open-ended test questions ({trait})",
            )
        )
    for trait in TRAITS:
        entries.append(
            _pinned(
                f"pb-search-{trait}", _NPTI, f"NPTI/dataset/search/{trait.capitalize()}.json",
                None, None, "no licence file (NPTI): cite NPTI", _CITE_NPTI,
                f"PersonalityBench search questions ({trait}), the pool DPN-LE draws its pairs from",
                verifiable=False, git_blob=_PB_SEARCH_BLOBS[trait],
            )
        )
    for trait, files in _NPTI_LIST_FILES.items():
        for suffix, (sha, nbytes) in zip(("", "_reversed"), files, strict=True):
            high = not suffix
            entries.append(
                _pinned(
                    f"npti-neurons-{trait}{'' if high else '-reversed'}", _NPTI,
                    f"NPTI/neuron_results/{trait.capitalize()}{suffix}_dict.json", sha, nbytes,
                    "no licence file (NPTI): cite NPTI", _CITE_NPTI,
                    f"NPTI's published {'HIGH' if high else 'LOW (reversed)'} neuron list for Llama-3-8B-Instruct "
                    f"({trait}; dpnle import-npti)",
                )
            )
    for trait in TRAITS:
        sha, nbytes = _ANTHROPIC_PERSONA_FILES[trait]
        entries.append(
            _pinned(
                f"anthropic-persona-{trait}", _ANTHROPIC_EVALS, f"persona/{trait}.jsonl",
                sha, nbytes, "CC BY 4.0", _CITE_ANTHROPIC,
                f"model-written persona statements ({trait}, 500 yes / 500 no)",
            )
        )
    for split in TOUCHE_SPLITS:
        (arg_sha, arg_bytes), (label_sha, label_bytes) = _TOUCHE_FILES[split]
        entries.append(
            _pinned(
                f"touche-arguments-{split}", _TOUCHE, f"data/raw/initial/arguments-{split}.tsv",
                arg_sha, arg_bytes, "CC BY-SA 4.0", _CITE_TOUCHE, f"Touche23-ValueEval arguments ({split})",
            )
        )
        entries.append(
            _pinned(
                f"touche-labels-{split}", _TOUCHE, f"data/raw/initial/labels-{split}.tsv",
                label_sha, label_bytes, "CC BY-SA 4.0", _CITE_TOUCHE, f"Touche23-ValueEval value labels ({split})",
            )
        )
    for subject, test_sha, test_bytes, dev_sha, dev_bytes in _MMLU_FILES:
        entries.append(
            _pinned(
                f"mmlu-test-{subject}", _MMLU, f"data/test/{subject}_test.csv", test_sha, test_bytes,
                "MIT", _CITE_MMLU, f"capability: MMLU test ({subject})",
            )
        )
        entries.append(
            _pinned(
                f"mmlu-dev-{subject}", _MMLU, f"data/dev/{subject}_dev.csv", dev_sha, dev_bytes,
                "MIT", _CITE_MMLU, f"capability: MMLU dev, few-shot examples ({subject})",
            )
        )
    registry = {entry.name: entry for entry in entries}
    assert len(registry) == len(entries), "duplicate dataset names in the registry"
    return registry
# fmt: on


REGISTRY: dict[str, DatasetFile] = _build_registry()


def _names_with_prefix(prefix: str) -> tuple[str, ...]:
    return tuple(name for name in REGISTRY if name.startswith(prefix))


GROUPS: dict[str, tuple[str, ...]] = {
    "questionnaires": ("ipip120", "mpi120", "ipip300", "ipip300-split", "pvq"),
    "personalitybench": ("pb-descriptions", *_names_with_prefix("pb-test-")),
    "pb-search": _names_with_prefix("pb-search-"),
    "anthropic-persona": _names_with_prefix("anthropic-persona-"),
    "touche": (
        *_names_with_prefix("touche-arguments-"),
        *_names_with_prefix("touche-labels-"),
        "touche-value-categories",
    ),
    "mmlu": _names_with_prefix("mmlu-"),
    "mmlu-test": _names_with_prefix("mmlu-test-"),
    "mmlu-dev": _names_with_prefix("mmlu-dev-"),
    "arc-challenge": ("arc-challenge-test", "arc-challenge-dev"),
    "capability": (
        "gsm8k",
        *_names_with_prefix("mmlu-"),
        "arc-challenge-test",
        "arc-challenge-dev",
        "hellaswag",
        "truthfulqa",
        "hotpotqa",
    ),
}


def verifiable_names() -> list[str]:
    """Every entry that can be checked against a pinned hash: what ``dpnle data fetch --all`` gets."""
    return [name for name, entry in REGISTRY.items() if entry.verifiable]


def get_entry(name: str) -> DatasetFile:
    try:
        return REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(REGISTRY) + list(GROUPS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownDatasetError(
            f"No dataset named {name!r}.{hint} Run `dpnle data list` to see every name; "
            f"groups: {', '.join(GROUPS)}."
        ) from None


def resolve_names(names: Iterable[str] = (), all_entries: bool = False) -> list[str]:
    """Expand dataset names and group names (``mmlu``, ``touche``, ...) into registry names.

    ``all_entries`` adds every verifiable entry. Order is kept and duplicates are dropped.
    """
    expanded: list[str] = []
    for name in names:
        if name in GROUPS:
            expanded.extend(GROUPS[name])
        else:
            expanded.append(get_entry(name).name)
    if all_entries:
        expanded.extend(verifiable_names())
    return list(dict.fromkeys(expanded))


def url(entry: DatasetFile | str) -> str:
    entry = get_entry(entry) if isinstance(entry, str) else entry
    return f"https://raw.githubusercontent.com/{entry.owner}/{entry.repo}/{entry.commit}/{entry.path}"


def cache_path(entry: DatasetFile | str) -> Path:
    entry = get_entry(entry) if isinstance(entry, str) else entry
    return datasets_cache_dir() / entry.owner / entry.repo / entry.commit / entry.path


def mirror_path(entry: DatasetFile | str, mirror: str | os.PathLike[str]) -> Path:
    entry = get_entry(entry) if isinstance(entry, str) else entry
    return Path(mirror).expanduser().resolve() / entry.owner / entry.repo / entry.commit / entry.path


# --------------------------------------------------------------------------------------------
# Fetch and verify


def _sha256_of(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Loaders call path() for every file they read; remembering which cached files were already
# hashed (by size and mtime) keeps repeated loads from re-hashing megabytes each time.
_HASHED: dict[Path, tuple[int, int, str]] = {}


def _cached_sha256(file: Path) -> str:
    stat = file.stat()
    known = _HASHED.get(file)
    if known and known[:2] == (stat.st_size, stat.st_mtime_ns):
        return known[2]
    sha = _sha256_of(file)
    _HASHED[file] = (stat.st_size, stat.st_mtime_ns, sha)
    return sha


def _git_blob_of(file: Path) -> str:
    """The file's git blob id: SHA-1 of ``blob <size>\\0`` followed by its bytes."""
    digest = hashlib.sha1(f"blob {file.stat().st_size}\0".encode())  # noqa: S324 (git's id, not security)
    with file.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_cached(entry: DatasetFile, target: Path) -> bool:
    if not target.is_file():
        return False
    if entry.sha256 is None:
        return entry.git_blob is None or _git_blob_of(target) == entry.git_blob
    return _cached_sha256(target) == entry.sha256


def is_pinned(name: str) -> bool:
    """True when the file has a pinned SHA-256 (or, for a file whose bytes were not at hand when
    it was pinned, its git blob id at the pinned commit), so that fetching it verifies its bytes."""
    entry = get_entry(name)
    return entry.sha256 is not None or entry.git_blob is not None


def fetch_summary(names: Sequence[str]) -> str:
    """The closing line of ``dpnle data fetch``: which files were verified against a pinned
    SHA-256, and which could not be (no pinned digest)."""
    unpinned = [name for name in names if not is_pinned(name)]
    by_blob = [name for name in names if get_entry(name).sha256 is None and is_pinned(name)]
    line = f"{len(names) - len(unpinned) - len(by_blob)} file(s) verified against a pinned SHA-256."
    if by_blob:
        line += f" {len(by_blob)} verified against the pinned commit's git blob id: {', '.join(by_blob)}."
    if unpinned:
        line += (
            f" {len(unpinned)} not verified (no pinned digest): {', '.join(unpinned)}; results built on "
            "them may not reproduce exactly."
        )
    return line


def fetch(name: str, force: bool = False) -> Path:
    """Return the cached local copy of a registry file, getting it first if needed; a pinned
    file's bytes are verified against its SHA-256 (an unpinned one, see :func:`is_pinned`, cannot be).

    Sources, in order: the cache; ``$DPNLE_DATA_MIRROR`` when set; the pinned GitHub URL.
    """
    entry = get_entry(name)
    target = cache_path(entry)
    if not force and _is_cached(entry, target):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    mirror = os.environ.get(MIRROR_ENV)
    if not entry.verifiable and is_pinned(entry.name):
        # Not in the offline mirror: downloaded from its pinned commit, checked by its git blob id.
        _write_verified(entry, target, _download_chunks(entry))
    elif not entry.verifiable:
        warnings.warn(
            f"{entry.name} is not pinned to a commit or hash (it is not in the offline mirror); "
            f"downloading the current {url(entry)}. Results built on it may not reproduce exactly.",
            UnpinnedDatasetWarning,
            stacklevel=2,
        )
        _write_verified(entry, target, _download_chunks(entry))
    elif mirror:
        _write_verified(entry, target, _mirror_chunks(entry, mirror))
    else:
        _write_verified(entry, target, _download_chunks(entry))
    return target


def path(name: str) -> Path:
    """Local path of a registry file, fetched on first use: what the loaders read from."""
    return fetch(name)


def _mirror_chunks(entry: DatasetFile, mirror: str) -> Iterator[bytes]:
    source = mirror_path(entry, mirror)
    if not source.is_file():
        raise DatasetUnavailableError(
            f"{entry.name}: {MIRROR_ENV} is set, but the mirror has no file at {source}. "
            f"Check that {MIRROR_ENV} points at the mirror's root (the folder holding <owner>/<repo>/...), "
            f"or unset it to download from {url(entry)}."
        )
    with source.open("rb") as handle:
        yield from iter(lambda: handle.read(_CHUNK_BYTES), b"")


def _offline_error(entry: DatasetFile, reason: object) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"Could not download {entry.name} from {url(entry)} ({reason}). If this machine is offline, "
        f"set {MIRROR_ENV}=/path/to/mirror to copy it from an offline mirror, or run "
        f"`dpnle data fetch {entry.name}` on a machine with internet and copy its cache "
        f"({datasets_cache_dir()}) here."
    )


def _download_chunks(entry: DatasetFile) -> Iterator[bytes]:
    request = urllib.request.Request(url(entry), headers={"User-Agent": "dpnle (dataset fetch)"})
    try:
        response = urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S)
    except urllib.error.HTTPError as error:
        # The host answered, so this is not an offline problem: the pinned file is gone or moved.
        raise DatasetUnavailableError(
            f"Could not download {entry.name}: {url(entry)} answered HTTP {error.code} {error.reason}. "
            f"The pinned file may have moved upstream; set {MIRROR_ENV}=/path/to/mirror to use an "
            f"offline mirror, and please report this to the dpnle maintainers."
        ) from error
    except (urllib.error.URLError, OSError) as error:
        raise _offline_error(entry, getattr(error, "reason", error)) from error
    with response:
        while True:
            try:
                chunk = response.read(_CHUNK_BYTES)
            except OSError as error:
                raise _offline_error(entry, error) from error
            if not chunk:
                return
            yield chunk


def _write_verified(entry: DatasetFile, target: Path, chunks: Iterable[bytes]) -> None:
    """Stream chunks to a temp file beside target, check the hash, then move it into place.

    The temp file lives in target's folder so that os.replace is an atomic rename: a reader never
    sees a half-written or unverified file, and an interrupted fetch leaves only the old state.
    """
    handle = tempfile.NamedTemporaryFile(
        dir=target.parent, prefix=f".{target.name}.", suffix=".part", delete=False
    )
    temp = Path(handle.name)
    try:
        digest = hashlib.sha256()
        with handle:
            for chunk in chunks:
                digest.update(chunk)
                handle.write(chunk)
        actual = digest.hexdigest()
        if entry.sha256 is None and entry.git_blob is not None and _git_blob_of(temp) != entry.git_blob:
            raise DatasetHashError(
                f"{entry.name} ({entry.source}/{entry.path}) is not the file of the pinned commit: its git blob "
                f"id is {_git_blob_of(temp)}, not {entry.git_blob}. The file was discarded. Retry, or copy it "
                f"from a clone of {entry.owner}/{entry.repo} at {entry.commit[:7]}."
            )
        if entry.sha256 is not None and actual != entry.sha256:
            raise DatasetHashError(
                f"{entry.name} ({entry.source}/{entry.path}) has the wrong SHA-256: expected "
                f"{entry.sha256}, got {actual}. The file was discarded. If it came from "
                f"{MIRROR_ENV}, the mirror copy is damaged or a different version; otherwise the "
                f"download was corrupted or the upstream file changed. Retry, or fetch it from a "
                f"known-good mirror."
            )
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _HASHED.pop(target, None)


@dataclass(frozen=True)
class VerifyResult:
    name: str
    path: Path
    present: bool
    # None when there is nothing to compare against (not present, or an unpinned entry).
    hash_ok: bool | None
    actual_sha256: str | None

    @property
    def ok(self) -> bool:
        return self.present and self.hash_ok is not False

    @property
    def verified(self) -> bool:
        """Present and equal to a pinned SHA-256 (``ok`` also holds for an unpinned file)."""
        return self.present and self.hash_ok is True


def verify(name: str) -> VerifyResult:
    """Check the cached copy of a registry file without fetching anything."""
    entry = get_entry(name)
    target = cache_path(entry)
    if not target.is_file():
        return VerifyResult(entry.name, target, present=False, hash_ok=None, actual_sha256=None)
    actual = _sha256_of(target)
    hash_ok = None if entry.sha256 is None else actual == entry.sha256
    if entry.sha256 is None and entry.git_blob is not None:
        hash_ok = _git_blob_of(target) == entry.git_blob
    return VerifyResult(entry.name, target, present=True, hash_ok=hash_ok, actual_sha256=actual)


@dataclass(frozen=True)
class EntryRow:
    name: str
    source: str
    path: str
    licence: str
    cached: bool
    verifiable: bool


def list_entries(names: Iterable[str] | None = None) -> list[EntryRow]:
    """Rows for ``dpnle data list``. ``cached`` means present in the cache (not re-hashed here)."""
    selected = resolve_names(names) if names is not None else list(REGISTRY)
    rows = []
    for name in selected:
        entry = REGISTRY[name]
        rows.append(
            EntryRow(
                name=entry.name,
                source=entry.source,
                path=entry.path,
                licence=entry.licence,
                cached=cache_path(entry).is_file(),
                verifiable=entry.verifiable,
            )
        )
    return rows


# --------------------------------------------------------------------------------------------
# Loader helpers


def _trait_name(trait: str) -> str:
    concept = get_concept(trait)
    if concept.kind != "trait":
        raise ValueError(
            f"{trait!r} is a Schwartz value; this dataset covers the Big Five traits: {', '.join(TRAITS)}."
        )
    return concept.name


def _read_json_lines(file: Path, source: str) -> list[dict[str, Any]]:
    records = []
    with file.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DatasetFormatError(
                    f"{source}: line {line_number} is not valid JSON ({error})."
                ) from error
    return records


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise DatasetFormatError(message + " The file does not match what dpnle was built against.")


# --------------------------------------------------------------------------------------------
# Personality questionnaires


@dataclass(frozen=True)
class IpipItem:
    id: str
    number: int  # 1-based item number within its inventory (IPIP-NEO-300 numbers for ipip300)
    text: str
    domain: str  # dpnle trait name
    facet: int  # 1..6 within the domain
    key: int  # +1: agreeing means more of the trait; -1: reverse-keyed
    facet_name: str | None = None


_DOMAIN_LETTERS: dict[str, str] = {
    "O": "openness",
    "C": "conscientiousness",
    "E": "extraversion",
    "A": "agreeableness",
    "N": "neuroticism",
}

# IPIP-NEO inventories cycle through the 30 facets in this order: N1 E1 O1 A1 C1 N2 E2 ... C6.
_FACET_CYCLE_DOMAINS = "NEOAC"


def _facet_of_item_number(number: int) -> tuple[str, int]:
    slot = (number - 1) % 30
    return _DOMAIN_LETTERS[_FACET_CYCLE_DOMAINS[slot % 5]], slot // 5 + 1


def load_ipip120() -> list[IpipItem]:
    """IPIP-NEO-120 (Johnson 2014) in inventory order: 24 items per trait, 4 per facet."""
    records = json.loads(path("ipip120").read_text(encoding="utf-8"))
    _expect(len(records) == 120, f"ipip120: expected 120 items, found {len(records)}.")
    items = []
    for number, record in enumerate(records, start=1):
        keyed = record["keyed"]
        _expect(keyed in ("plus", "minus"), f"ipip120: item {number} has keyed={keyed!r}.")
        items.append(
            IpipItem(
                id=f"ipip120-{number}",
                number=number,
                text=record["text"].strip(),
                domain=_DOMAIN_LETTERS[record["domain"]],
                facet=int(record["facet"]),
                key=1 if keyed == "plus" else -1,
            )
        )
    return items


def load_mpi120() -> list[IpipItem]:
    """MPI-120: the IPIP-NEO-120 items in the same order, as worded by Jiang et al. (2023)."""
    with path("mpi120").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    _expect(len(rows) == 120, f"mpi120: expected 120 items, found {len(rows)}.")
    items = []
    for number, row in enumerate(rows, start=1):
        domain, facet = _facet_of_item_number(number)
        _expect(
            _DOMAIN_LETTERS[row["label_ocean"]] == domain, f"mpi120: item {number} is out of inventory order."
        )
        items.append(
            IpipItem(
                id=f"mpi120-{number}",
                number=number,
                text=row["text"].strip(),
                domain=domain,
                facet=facet,
                key=int(row["key"]),
                facet_name=row["label_raw"].strip(),
            )
        )
    return items


def load_ipip300(split: Literal["all", "train", "test"] = "all") -> list[IpipItem]:
    """IPIP-NEO-300 with DPN-LE's split: ``train`` = the 120 items of the IPIP-NEO-120,
    ``test`` = the 180 held-out items.

    The split file lists IPIP-NEO-300 item numbers (1-based), not CSV row positions: PAlign wrote
    ``mpi_300.csv`` in the item-key sheet's row order, which is ``train_index + test_index``, so
    CSV row k holds item ``(train_index + test_index)[k]``. We check that alignment against the
    facet cycle of the item numbers before trusting it.
    """
    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', not {split!r}.")
    with path("ipip300").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    layout = json.loads(path("ipip300-split").read_text(encoding="utf-8"))
    train_numbers, test_numbers = list(layout["train_index"]), list(layout["test_index"])
    _expect(
        len(train_numbers) == 120 and len(test_numbers) == 180,
        f"ipip300-split: expected 120 train / 180 test items, found {len(train_numbers)} / {len(test_numbers)}.",
    )
    all_numbers = train_numbers + test_numbers
    _expect(
        sorted(all_numbers) == list(range(1, 301)),
        "ipip300-split: train and test item numbers must be disjoint and cover 1..300.",
    )
    _expect(len(rows) == 300, f"ipip300: expected 300 items, found {len(rows)}.")

    items = []
    for row, number in zip(rows, all_numbers, strict=True):
        domain, facet = _facet_of_item_number(number)
        _expect(
            _DOMAIN_LETTERS[row["label_ocean"]] == domain,
            f"ipip300: the row for item {number} ({row['text']!r}) is labelled {row['label_ocean']}, "
            f"but item {number} belongs to {domain}.",
        )
        items.append(
            IpipItem(
                id=f"ipip300-{number}",
                number=number,
                text=row["text"].strip(),
                domain=domain,
                facet=facet,
                key=int(row["key"]),
                facet_name=row["label_raw"].strip(),
            )
        )
    if split == "train":
        return items[:120]
    if split == "test":
        return items[120:]
    return items


@dataclass(frozen=True)
class PersonaDescription:
    id: str
    trait: str
    pole: Literal["high", "low"]
    index: int
    text: str


def load_pb_descriptions(trait: str, strip: bool = True) -> list[PersonaDescription]:
    """PersonalityBench persona descriptions of one trait: 80 high-pole, then 80 low-pole.

    Each line of the file holds one description per trait; ``<Trait>_reversed`` is the low pole.
    High and low descriptions on the same line share an index. Each pole keeps the order of the
    file's lines, the order the reference's ``load_descriptions`` reads them in (its random
    draws index into that order). ``strip=False`` keeps each text as the file has it, as the
    reference does (the pinned file has no surrounding whitespace, so both give the same text).
    """
    trait = _trait_name(trait)
    records = _read_json_lines(path("pb-descriptions"), "pb-descriptions")
    key = trait.capitalize()
    high: list[PersonaDescription] = []
    low: list[PersonaDescription] = []
    for index, record in enumerate(records):
        for pole, field, bucket in (("high", key, high), ("low", f"{key}_reversed", low)):
            text = record.get(field)
            if text:
                bucket.append(
                    PersonaDescription(
                        id=f"pb-desc-{trait}-{pole}-{index}",
                        trait=trait,
                        pole=pole,
                        index=index,
                        text=text.strip() if strip else text,
                    )
                )
    _expect(
        len(high) == 80 and len(low) == 80,
        f"pb-descriptions: expected 80 high and 80 low descriptions of {trait}, found {len(high)} / {len(low)}.",
    )
    return high + low


@dataclass(frozen=True)
class Question:
    id: str
    text: str


def load_pb_test(trait: str) -> list[Question]:
    """PersonalityBench's open-ended test questions for one trait (89 to 100 per trait)."""
    trait = _trait_name(trait)
    name = f"pb-test-{trait}"
    records = _read_json_lines(path(name), name)
    questions = [Question(id=f"{name}-{n}", text=r["question"].strip()) for n, r in enumerate(records)]
    _expect(80 <= len(questions) <= 110, f"{name}: expected about 90 questions, found {len(questions)}.")
    return questions


@dataclass(frozen=True)
class SearchQuestion:
    id: str
    text: str
    trait: str
    # NPTI's metadata; None when a user-supplied file only has "question".
    facet: str | None = None  # facet tag, e.g. "Dutifulness"
    item: str | None = None  # the IPIP item the question was written from
    topic: str | None = None
    key: int | None = None  # +1 / -1 from NPTI's "sign"


def load_pb_search(
    trait: str, path: str | os.PathLike[str] | None = None, strip: bool = True
) -> list[SearchQuestion]:
    """PersonalityBench's search questions (NPTI), the pool DPN-LE draws its contrastive prompts from,
    in file order.

    ``path`` may name a local JSON-lines file with a ``question`` field per line (for example, a copy
    made on a machine with internet); otherwise the file pinned at NPTI's commit is downloaded (it
    is not in the offline mirror). ``strip=False`` keeps each question as the file has it, as the
    reference does.
    """
    trait = _trait_name(trait)
    name = f"pb-search-{trait}"
    source = Path(path).expanduser() if path is not None else fetch(name)
    if not source.is_file():
        raise FileNotFoundError(
            f"No search-question file at {source}: pass a JSON-lines file with a 'question' per line."
        )
    records = _read_json_lines(source, str(source))
    questions = []
    for n, record in enumerate(records):
        if "question" not in record:
            raise DatasetFormatError(
                f"{source}: record {n + 1} has no 'question' field (keys: {sorted(record)})."
            )
        sign = record.get("sign")
        questions.append(
            SearchQuestion(
                id=f"{name}-{n}",
                text=record["question"].strip() if strip else record["question"],
                trait=trait,
                facet=record.get("tag"),
                item=record.get("facet"),
                topic=record.get("topic"),
                key={"+": 1, "-": -1}.get(sign) if sign else None,
            )
        )
    return questions


@dataclass(frozen=True)
class PersonaStatement:
    id: str
    trait: str
    statement: str
    question: str
    answer_matching_behavior: str  # " Yes" or " No", with the leading space
    answer_not_matching_behavior: str
    label_confidence: float

    @property
    def expresses_trait(self) -> bool:
        """True when someone high in the trait would say the statement."""
        return self.answer_matching_behavior.strip() == "Yes"


def load_anthropic_persona(trait: str) -> list[PersonaStatement]:
    """Anthropic's model-written persona statements: 1,000 per trait, 500 matching with " Yes"."""
    trait = _trait_name(trait)
    name = f"anthropic-persona-{trait}"
    statements = [
        PersonaStatement(
            id=f"{name}-{n}",
            trait=trait,
            statement=r["statement"],
            question=r["question"],
            answer_matching_behavior=r["answer_matching_behavior"],
            answer_not_matching_behavior=r["answer_not_matching_behavior"],
            label_confidence=float(r["label_confidence"]),
        )
        for n, r in enumerate(_read_json_lines(path(name), name))
    ]
    _expect(len(statements) == 1000, f"{name}: expected 1,000 statements, found {len(statements)}.")
    return statements


# --------------------------------------------------------------------------------------------
# Schwartz values


@dataclass(frozen=True)
class Argument:
    id: str
    conclusion: str
    stance: str  # "in favor of" or "against"
    premise: str
    labels: dict[str, int]  # Touche value category -> 0/1

    @property
    def schwartz_values(self) -> dict[str, int]:
        return touche_to_schwartz(self.labels)


# Touche23-ValueEval uses Schwartz et al.'s (2012) refined 19 values plus "Universalism:
# objectivity"; dpnle works with the original 10. Sub-values go to their parent value. Two
# categories have no single parent in the refined theory; we follow where the 10-value
# instruments put them: Face to power (the SVS lists "preserving my public image" as a power item)
# and Humility to tradition (PVQ-40 item 38, "humble and modest", is scored as tradition).
TOUCHE_TO_SCHWARTZ: dict[str, str] = {
    "Self-direction: thought": "self_direction",
    "Self-direction: action": "self_direction",
    "Stimulation": "stimulation",
    "Hedonism": "hedonism",
    "Achievement": "achievement",
    "Power: dominance": "power",
    "Power: resources": "power",
    "Face": "power",
    "Security: personal": "security",
    "Security: societal": "security",
    "Tradition": "tradition",
    "Conformity: rules": "conformity",
    "Conformity: interpersonal": "conformity",
    "Humility": "tradition",
    "Benevolence: caring": "benevolence",
    "Benevolence: dependability": "benevolence",
    "Universalism: concern": "universalism",
    "Universalism: nature": "universalism",
    "Universalism: tolerance": "universalism",
    "Universalism: objectivity": "universalism",
}


def touche_to_schwartz(labels: dict[str, int]) -> dict[str, int]:
    """Collapse Touche's 20 category labels to the 10 values: 1 if any of a value's categories is 1."""
    values = dict.fromkeys(VALUES, 0)
    for category, flag in labels.items():
        value = TOUCHE_TO_SCHWARTZ.get(category)
        if value is None:
            raise DatasetFormatError(f"Unknown Touche value category {category!r}.")
        values[value] = max(values[value], int(flag))
    return values


def _read_tsv(file: Path) -> list[list[str]]:
    # The TSVs do not use CSV quoting: premises contain literal double quotes.
    with file.open(encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def load_touche(split: Literal["training", "validation", "test"] = "training") -> list[Argument]:
    """Touche23-ValueEval arguments joined with their 20 value labels on Argument ID."""
    if split not in TOUCHE_SPLITS:
        raise ValueError(f"split must be one of {', '.join(TOUCHE_SPLITS)}, not {split!r}.")
    argument_rows = _read_tsv(path(f"touche-arguments-{split}"))
    label_rows = _read_tsv(path(f"touche-labels-{split}"))
    argument_header, label_header = argument_rows[0], label_rows[0]
    _expect(
        argument_header == ["Argument ID", "Conclusion", "Stance", "Premise"],
        f"touche-arguments-{split}: unexpected columns {argument_header}.",
    )
    categories = label_header[1:]
    _expect(
        label_header[0] == "Argument ID" and set(categories) == set(TOUCHE_TO_SCHWARTZ),
        f"touche-labels-{split}: unexpected columns {label_header}.",
    )
    labels_by_id = {
        row[0]: {c: int(flag) for c, flag in zip(categories, row[1:], strict=True)} for row in label_rows[1:]
    }
    arguments = []
    for argument_id, conclusion, stance, premise in argument_rows[1:]:
        if argument_id not in labels_by_id:
            raise DatasetFormatError(f"touche-labels-{split}: no labels for argument {argument_id}.")
        arguments.append(Argument(argument_id, conclusion, stance, premise, labels_by_id[argument_id]))
    _expect(
        len(arguments) == len(labels_by_id),
        f"touche-{split}: {len(labels_by_id)} label rows for {len(arguments)} arguments.",
    )
    return arguments


@dataclass(frozen=True)
class PvqItem:
    id: str
    number: int  # PVQ-40 item number
    text: str
    value: str  # dpnle value name
    key: int  # ValueBench's agreement direction; +1 for every PVQ-40 item
    question: str  # ValueBench's rewording of the item as a question


def load_pvq40() -> list[PvqItem]:
    """The 40 PVQ-40 portraits from ValueBench, in questionnaire order (3 to 6 items per value)."""
    with path("pvq").open(encoding="utf-8", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["questionnaire"] == "PVQ40"]
    _expect(len(rows) == 40, f"pvq: expected 40 PVQ-40 items, found {len(rows)}.")
    items = []
    for number, row in enumerate(rows, start=1):
        value = row["value"].strip().lower().replace("-", "_").replace(" ", "_")
        _expect(value in VALUES, f"pvq: item {number} has value {row['value']!r}, not one of Schwartz's ten.")
        items.append(
            PvqItem(
                id=f"pvq40-{number}",
                number=number,
                text=row["item"].strip(),
                value=value,
                key=int(row["agreement"]),
                question=row["question"].strip(),
            )
        )
    _expect(
        set(item.value for item in items) == set(VALUES), "pvq: some Schwartz values have no PVQ-40 item."
    )
    return items


# --------------------------------------------------------------------------------------------
# Capability benchmarks


@dataclass(frozen=True)
class GsmItem:
    id: str
    question: str
    answer_text: str  # the worked solution, ending in "#### <answer>"
    answer: str  # the final number with thousands separators removed, e.g. "1450000"


def load_gsm8k() -> list[GsmItem]:
    records = _read_json_lines(path("gsm8k"), "gsm8k")
    items = []
    for n, record in enumerate(records):
        solution = record["answer"]
        _expect("####" in solution, f"gsm8k: item {n} has no '####' final answer.")
        final = solution.rsplit("####", 1)[1].strip().replace(",", "")
        items.append(
            GsmItem(id=f"gsm8k-{n}", question=record["question"], answer_text=solution, answer=final)
        )
    _expect(len(items) == 1319, f"gsm8k: expected 1,319 test items, found {len(items)}.")
    return items


@dataclass(frozen=True)
class McItem:
    id: str
    question: str
    choices: tuple[str, ...]
    answer_index: int
    subject: str | None = None


_LETTERS = "ABCDEFGH"


def load_mmlu(subjects: Iterable[str] | None = None, split: Literal["test", "dev"] = "test") -> list[McItem]:
    """MMLU questions (Sept 2020 release). ``dev`` holds the 5 few-shot examples per subject."""
    if split not in ("test", "dev"):
        raise ValueError(f"split must be 'test' or 'dev', not {split!r}.")
    chosen = list(subjects) if subjects is not None else list(MMLU_SUBJECTS)
    unknown = [s for s in chosen if s not in MMLU_SUBJECTS]
    if unknown:
        raise UnknownDatasetError(
            f"Unknown MMLU subject(s) {unknown}; known subjects: {', '.join(MMLU_SUBJECTS)}."
        )
    items = []
    for subject in chosen:
        name = f"mmlu-{split}-{subject}"
        with path(name).open(encoding="utf-8", newline="") as handle:
            for n, row in enumerate(csv.reader(handle)):
                _expect(
                    len(row) == 6 and row[5] in "ABCD", f"{name}: row {n} is not question,A,B,C,D,answer."
                )
                items.append(
                    McItem(
                        id=f"{name}-{n}",
                        question=row[0],
                        choices=tuple(row[1:5]),
                        answer_index=_LETTERS.index(row[5]),
                        subject=subject,
                    )
                )
    return items


def load_arc_challenge(split: Literal["test", "dev"] = "test") -> list[McItem]:
    """ARC-Challenge. This copy drops the 22 test items whose choices are labelled 1-4 (1,150 remain);
    a few items have 3 or 5 choices."""
    if split not in ("test", "dev"):
        raise ValueError(f"split must be 'test' or 'dev', not {split!r}.")
    name = f"arc-challenge-{split}"
    items = []
    for record in _read_json_lines(path(name), name):
        choices = record["question"]["choices"]
        labels = [choice["label"] for choice in choices]
        _expect(
            record["answerKey"] in labels, f"{name}: item {record['id']} has answer {record['answerKey']!r}."
        )
        items.append(
            McItem(
                id=record["id"],
                question=record["question"]["stem"],
                choices=tuple(choice["text"] for choice in choices),
                answer_index=labels.index(record["answerKey"]),
                subject="arc-challenge",
            )
        )
    return items


def load_hellaswag() -> list[McItem]:
    """HellaSwag validation, 10,042 items. ``question`` is "<activity label>: <context>" as in the
    file; ``subject`` is the activity label. Each record in the file is 6 lines: context, label, 4 endings."""
    with bz2.open(path("hellaswag"), "rt", encoding="utf-8", newline="") as handle:
        # split on "\n" only: str.splitlines would also break on Unicode separators inside a context.
        lines = handle.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    _expect(len(lines) % 6 == 0, f"hellaswag: {len(lines)} lines is not a whole number of 6-line records.")
    items = []
    for n in range(len(lines) // 6):
        context, label, *endings = lines[6 * n : 6 * n + 6]
        _expect(label in ("0", "1", "2", "3"), f"hellaswag: record {n} has label {label!r}.")
        activity = context.split(": ", 1)[0]
        items.append(
            McItem(
                id=f"hellaswag-{n}",
                question=context,
                choices=tuple(endings),
                answer_index=int(label),
                subject=activity,
            )
        )
    _expect(len(items) == 10042, f"hellaswag: expected 10,042 items, found {len(items)}.")
    return items


def load_truthfulqa_mc1(shuffle_seed: int | None = None) -> list[McItem]:
    """TruthfulQA MC1 (817 questions, exactly one true answer each).

    In the file the true answer is always listed first; evaluations that show lettered choices
    should pass ``shuffle_seed`` so position does not give the answer away. The shuffle is
    deterministic per (seed, item).
    """
    records = json.loads(path("truthfulqa").read_text(encoding="utf-8"))
    items = []
    for n, record in enumerate(records):
        targets: dict[str, int] = record["mc1_targets"]
        choices = list(targets)
        _expect(
            sum(targets.values()) == 1,
            f"truthfulqa: question {n} has {sum(targets.values())} true MC1 answers.",
        )
        correct = choices[[targets[c] for c in choices].index(1)]
        if shuffle_seed is not None:
            random.Random(f"{shuffle_seed}-truthfulqa-{n}").shuffle(choices)
        items.append(
            McItem(
                id=f"truthfulqa-{n}",
                question=record["question"],
                choices=tuple(choices),
                answer_index=choices.index(correct),
                subject=None,
            )
        )
    _expect(len(items) == 817, f"truthfulqa: expected 817 questions, found {len(items)}.")
    return items


@dataclass(frozen=True)
class QaItem:
    id: str
    question: str
    answer: str
    kind: str  # HotpotQA question type: "bridge" or "comparison"
    level: str
    context: str | None  # this copy ships no supporting paragraphs: always None here


def load_hotpotqa() -> list[QaItem]:
    """HotpotQA validation as DPN-LE ships it: 7,405 "hard" questions, closed-book (no context)."""
    records = json.loads(path("hotpotqa").read_text(encoding="utf-8"))
    items = [
        QaItem(
            id=record["id"],
            question=record["question"],
            answer=record["answer"],
            kind=record.get("type", ""),
            level=record.get("level", ""),
            context=record.get("context") or None,
        )
        for record in records
    ]
    _expect(len({item.id for item in items}) == len(items), "hotpotqa: duplicate question ids.")
    return items
